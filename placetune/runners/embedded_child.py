"""Child process of the embedded runner: load one placement through llama.cpp's C API and time pp and tg.

Run as `python -m placetune.runners.embedded_child` with a JSON request on stdin. It writes one JSON
result to stdout; llama.cpp's whole log (every level, so the DEBUG `buffer type overridden` lines
too) goes to stderr for the parent to keep. A crash or out-of-memory here never reaches the search.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import resource
import sys
import time
from typing import Any

LOAD_MODES = {"auto": -1, "none": 0, "mmap": 1, "mlock": 2, "mmap+mlock": 3, "dio": 4}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}  # enum llama_split_mode


class _BuftOverride(ctypes.Structure):
    _fields_ = (("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p))


class _Ggml:
    """The few ggml backend-device calls that llama-cpp-python does not wrap."""

    def __init__(self) -> None:
        from llama_cpp._ggml import libggml

        lib = libggml
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for name, res, args in (
            ("ggml_backend_dev_count", sz, []),
            ("ggml_backend_dev_get", vp, [sz]),
            ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_buffer_type", vp, [vp]),
            ("ggml_backend_buft_name", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib = lib

    def add_rpc_servers(self, endpoints: list[str]) -> None:
        """Register RPC servers as devices (RPC0, RPC1, ...), as llama.cpp's --rpc does."""
        if not endpoints:
            return
        from llama_cpp._ggml import libggml_base_path

        rpc = ctypes.CDLL(str(libggml_base_path / "libggml-rpc.so"))
        rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
        rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        self.lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
        for endpoint in endpoints:
            reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
            if not reg:
                raise RuntimeError(f"RPC server {endpoint} could not be added")
            self.lib.ggml_backend_register(reg)

    def devices(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.lib.ggml_backend_dev_count()):
            dev = self.lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            self.lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            buft = self.lib.ggml_backend_dev_buffer_type(dev)
            out.append({
                "name": self.lib.ggml_backend_dev_name(dev).decode(),
                "description": self.lib.ggml_backend_dev_description(dev).decode(),
                "buffer_type": self.lib.ggml_backend_buft_name(buft).decode() if buft else "",
                "free_bytes": free.value,
                "total_bytes": total.value,
                "_buft": buft,
                "_dev": dev,
            })
        return out

    def buffer_types(self) -> dict[str, int]:
        """Buffer type by device name and by buffer-type name, as llama.cpp's -ot parser accepts both."""
        table: dict[str, int] = {}
        for d in self.devices():
            if d["_buft"]:
                table[d["buffer_type"]] = d["_buft"]
                table.setdefault(d["name"], d["_buft"])
        return table


def _log_to_stderr() -> Any:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        sys.stderr.write(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback  # keep a reference: ctypes callbacks must outlive their use


def _fail(out: Any, status: str, reason: str) -> None:
    out.write(json.dumps({"status": status, "reason": reason}) + "\n")
    out.flush()
    sys.exit(3)


# The environment knobs are read when the backends start, so they belong to the child, like the model.
MODEL_KEYS = ("n_gpu_layers", "load_mode", "repack", "tensor_split", "split_mode", "env")


def model_key(request: dict[str, Any]) -> str:
    """What decides the loaded model: a request with the same key can reuse it, knobs aside."""
    placement = request["placement"]
    return json.dumps([request["model"], request["overrides"], request.get("rpc", []),
                       [placement.get(k) for k in MODEL_KEYS]])


class Worker:
    """Holds the backend and, between requests with the same model key, the loaded model."""

    def __init__(self, out: Any, rpc: list[str]) -> None:
        import llama_cpp

        self.llama_cpp, self.out, self.rpc = llama_cpp, out, rpc
        llama_cpp.llama_backend_init()
        self.ggml = _Ggml()
        self.ggml.add_rpc_servers(rpc)
        self.devices = self.ggml.devices()
        self.build = {
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }
        self.public_devices = [{k: v for k, v in d.items() if not k.startswith("_")} for d in self.devices]
        self.model: Any = None
        self.key = ""
        self.keep: list[Any] = []
        self.load_s = 0.0

    def load(self, request: dict[str, Any]) -> None:
        llama_cpp = self.llama_cpp
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model, self.keep = None, []
        placement = request["placement"]
        mparams = llama_cpp.llama_model_default_params()
        if placement.get("n_gpu_layers") is not None:
            mparams.n_gpu_layers = placement["n_gpu_layers"]
        if placement.get("load_mode") is not None:
            mparams.load_mode = LOAD_MODES[placement["load_mode"]]
        if placement.get("repack") is not None:
            mparams.use_extra_bufts = bool(placement["repack"])
        if self.rpc:
            # llama.cpp's default device selection here skips RPC devices registered after start-up,
            # so list them explicitly, in llama.cpp's own order: RPC servers first, then accelerators.
            accel = [d for d in self.devices if d["name"] != "CPU"]
            ordered = sorted(accel, key=lambda d: not d["name"].startswith("RPC"))
            arr = (ctypes.c_void_p * (len(ordered) + 1))(*[d["_dev"] for d in ordered], None)
            self.keep.append(arr)
            mparams.devices = ctypes.cast(arr, ctypes.c_void_p)
        if placement.get("split_mode") is not None:
            mparams.split_mode = SPLIT_MODES[placement["split_mode"]]
        if placement.get("tensor_split"):
            n = llama_cpp.llama_max_devices()
            split = (ctypes.c_float * n)(*placement["tensor_split"][:n])
            self.keep.append(split)
            mparams.tensor_split = split
        rules = request["overrides"]
        if rules:
            bufts = self.ggml.buffer_types()
            arr = (_BuftOverride * (len(rules) + 1))()
            for i, (pattern, buft) in enumerate(rules):
                if buft not in bufts:
                    _fail(self.out, "bad-args",
                          f"unknown buffer type {buft!r}; this llama.cpp has {', '.join(sorted(bufts))}")
                encoded = pattern.encode()
                self.keep.append(encoded)
                arr[i].pattern, arr[i].buft = encoded, bufts[buft]
            self.keep.append(arr)
            mparams.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        t0 = time.perf_counter()
        self.model = llama_cpp.llama_model_load_from_file(request["model"].encode(), mparams)
        if not self.model:
            _fail(self.out, "error", "llama.cpp could not load the model (see the log)")
        self.load_s = time.perf_counter() - t0
        self.key = model_key(request)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("probe"):
            return {"status": "ok", "devices": self.public_devices, "build": self.build}
        reused = self.model is not None and self.key == model_key(request)
        if not reused:
            self.load(request)
        result = self.measure(request)
        result["reused_model"] = reused
        return result

    def measure(self, request: dict[str, Any]) -> dict[str, Any]:
        llama_cpp, out, model = self.llama_cpp, self.out, self.model
        placement, workload = request["placement"], request["workload"]
        n_prompt, n_gen, depth = workload["n_prompt"], workload["n_gen"], workload["depth"]
        t0 = time.perf_counter()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max(placement.get("ctx") or 0, depth + n_prompt + n_gen)
        if placement.get("parallel"):
            # As llama-server -np N: N sequences, each with its own share of the cache (not unified).
            cparams.n_seq_max = placement["parallel"]
            cparams.kv_unified = False
        cparams.n_batch = placement.get("batch") or cparams.n_batch
        cparams.n_ubatch = placement.get("ubatch") or cparams.n_ubatch
        threads = placement.get("threads") or request["default_threads"]
        cparams.n_threads = cparams.n_threads_batch = threads
        if placement.get("flash_attn") is not None:
            cparams.flash_attn_type = FLASH_ATTN[placement["flash_attn"]]
        for key, field in (("cache_type_k", "type_k"), ("cache_type_v", "type_v")):
            if placement.get(key) is not None:
                setattr(cparams, field, request["ggml_types"][key])
        cparams.op_offload = not placement.get("no_op_offload", False)
        cparams.swa_full = False  # as llama-server and llama-bench; the C API's default (true) sizes SWA caches in full
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            _fail(out, "error", "llama.cpp could not create a context (see the log)")
        load_s = self.load_s + time.perf_counter() - t0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        n_batch = cparams.n_batch
        batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        rng = random.Random(request.get("seed", 0))
        memory = llama_cpp.llama_get_memory(ctx)

        def decode(n_tokens: int, pos0: int) -> None:
            done = 0
            while done < n_tokens:
                n = min(n_batch, n_tokens - done)
                batch.n_tokens = n
                for j in range(n):
                    batch.token[j] = rng.randrange(n_vocab)
                    batch.pos[j] = pos0 + done + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = j == n - 1
                rc = llama_cpp.llama_decode(ctx, batch)
                if rc != 0:
                    _fail(out, "oom" if rc in (1, -2) else "error", f"llama_decode returned {rc}")
                done += n

        def prefill() -> None:
            """An empty KV cache, then `depth` tokens in it (untimed), like llama-bench -d."""
            llama_cpp.llama_memory_clear(memory, True)
            if depth:
                decode(depth, 0)
                llama_cpp.llama_synchronize(ctx)

        def prompt_pass(n: int) -> float:
            prefill()
            start = time.perf_counter()
            decode(n, depth)
            llama_cpp.llama_synchronize(ctx)
            return time.perf_counter() - start

        def gen_pass(n: int) -> float:
            prefill()
            start = time.perf_counter()
            for i in range(n):
                decode(1, depth + i)
            llama_cpp.llama_synchronize(ctx)
            return time.perf_counter() - start

        for _ in range(workload["warmups"]):
            if n_prompt:
                prompt_pass(n_prompt)
            if n_gen:
                gen_pass(min(n_gen, 16))
        pp, tg, measure_s = [], [], 0.0
        for _ in range(workload["repetitions"]):
            if n_prompt:
                dt = prompt_pass(n_prompt)
                pp.append(n_prompt / dt)
                measure_s += dt
            if n_gen:
                dt = gen_pass(n_gen)
                tg.append(n_gen / dt)
                measure_s += dt
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        return {
            "status": "ok",
            "pp": pp,
            "tg": tg,
            "load_s": load_s,
            "measure_s": measure_s,
            "threads": threads,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "devices": self.public_devices,
            "build": self.build,
        }


def main() -> None:
    """Serve requests, one JSON line each, until stdin closes (the parent is done or gone)."""
    # llama.cpp may print to stdout; keep the real stdout for the JSON results only.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    callback = _log_to_stderr()
    worker: Worker | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if worker is None:
            worker = Worker(out, request.get("rpc", []))
        out.write(json.dumps(worker.handle(request)) + "\n")
        out.flush()
    del callback


if __name__ == "__main__":
    main()

"""Shared fixtures: tiny synthetic models written once per session, and real llama.cpp runs on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from placetune.synth import SynthSpec, tiny_spec, write_model

# Runs in a child process so that a crash inside llama.cpp fails one test instead of the whole session.
# ggml's AMX weight repack segfaults in ggml_backend_amx_mul_mat on some Sapphire Rapids CPUs
# (ggml-org/llama.cpp#20824), and llama_cpp.Llama has no switch for it, so the child turns the
# extra buffer types off the way llama.cpp's --no-repack does.
_GENERATE = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import llama_cpp as C

_defaults = C.llama_model_default_params
def _no_repack():
    params = _defaults()
    params.use_extra_bufts = False
    return params
C.llama_model_default_params = _no_repack

path, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_gpu_layers=0, n_threads=2, logits_all=True, verbose=False)
tokens = llm.tokenize(prompt.encode())
out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
print(json.dumps({
    "prompt_tokens": tokens,
    "roundtrip": llm.detokenize(tokens).decode(),
    "text": out["choices"][0]["text"],
    "finish_reason": out["choices"][0]["finish_reason"],
    "finite": bool(np.isfinite(llm.scores[: llm.n_tokens]).all()),
}))
"""


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_model(spec) or make_model("qwen3moe", **tiny_spec_args): the model's path, written once."""
    root = tmp_path_factory.mktemp("models")
    written: dict[SynthSpec, Path] = {}

    def make(spec: SynthSpec | str, **overrides: Any) -> Path:
        if isinstance(spec, str):
            spec = tiny_spec(spec, **overrides)
        if spec not in written:
            written[spec] = write_model(spec, root / f"{spec.arch}-{len(written)}.gguf")
        return written[spec]

    return make


@pytest.fixture(scope="session")
def tiny_dense(make_model: Callable[..., Path]) -> Path:
    return make_model("llama", n_layers=2)


@pytest.fixture(scope="session")
def tiny_moe(make_model: Callable[..., Path]) -> Path:
    """qwen3moe: 4 layers, 8 experts of which 2 are used, n_embd 128."""
    return make_model("qwen3moe")


@pytest.fixture(scope="session")
def tiny_shexp(make_model: Callable[..., Path]) -> Path:
    """glm4moe: 4 layers, the first dense, then 8 routed experts plus 1 shared expert."""
    return make_model("glm4moe")


@pytest.fixture(scope="session")
def llama_generate() -> Callable[..., dict[str, Any]]:
    """llama_generate(path, prompt, max_tokens): tokenize and greedily generate on CPU in real llama.cpp."""

    def generate(path: Path, prompt: str = "The quick brown fox", max_tokens: int = 4) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-c", _GENERATE, str(path), prompt, str(max_tokens)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert proc.returncode == 0, f"llama.cpp exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return generate


# ggml-rpc-server and a single-threaded client on a 2-core VM: round-trip latency, and so tg, is
# bimodal depending on where the scheduler puts the two processes. Speed comparisons pin both here.
RPC_CPU = 0


@contextmanager
def on_rpc_cpu() -> Iterator[None]:
    """Run what is started inside (llama.cpp children inherit it) on the RPC server's CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {RPC_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture(scope="session")
def rpc_server(make_model: Callable[..., Path]) -> Iterator[str]:
    """A real second device for the session: ggml-rpc-server on a free loopback port, stopped at the end."""
    from placetune.placement import Placement
    from placetune.runners.base import Workload
    from placetune.runners.embedded import EmbeddedRunner
    from placetune.runners.rpc import rpc_server as start_rpc_server

    with start_rpc_server(cpu=RPC_CPU) as endpoint:
        # The first client of a fresh ggml-rpc-server runs several times slower than later ones; one
        # throwaway run keeps that out of the tests' numbers.
        EmbeddedRunner(rpc=[endpoint]).measure(make_model("qwen3moe"), Placement(n_gpu_layers=999, repack=False),
                                               Workload(n_prompt=16, n_gen=16, repetitions=1, warmups=1))
        yield endpoint


@pytest.fixture(scope="session")
def rpc_pair(make_model: Callable[..., Path]) -> Iterator[tuple[str, str]]:
    """Two real devices, RPC0 and RPC1: two ggml-rpc-servers on free loopback ports, warmed like rpc_server."""
    from placetune.placement import Placement
    from placetune.runners.base import Workload
    from placetune.runners.embedded import EmbeddedRunner
    from placetune.runners.rpc import rpc_server as start_rpc_server

    with start_rpc_server() as first, start_rpc_server() as second:
        EmbeddedRunner(rpc=[first, second]).measure(
            make_model("qwen3moe"), Placement(n_gpu_layers=999, repack=False),
            Workload(n_prompt=16, n_gen=16, repetitions=1, warmups=1))
        yield first, second

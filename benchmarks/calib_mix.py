"""Code-only vs code+prose calibration: code and prose perplexity after GPTQ 4-bit and decompose 0.8.

Every step is an ordinary `lowrank` command (printed as it runs), so each figure can be reproduced by hand:

    lowrank quantize MODEL -o OUT --calib CALIB --calib-samples 16 --skip-eval --json
    lowrank decompose MODEL -o OUT --params-ratio 0.8 --calib CALIB --calib-samples 16 --json
    lowrank eval OUT --data stdlib|stdlib-prose --max-tokens 4096 --json

with CALIB = stdlib (code only, the old default) and stdlib-mix (code and its documentation, in pairs).
Evaluation is on the held-out "eval" parts, disjoint from every calibration part.

    flock /tmp/lowrank-bench.lock python benchmarks/calib_mix.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def run(args: list[str]) -> dict:
    print("$", " ".join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    doc = json.loads(done.stdout)
    doc["_seconds"] = round(time.perf_counter() - start, 1)
    return doc


def perplexities(folder: str, tokens: int) -> dict:
    return {kind: run(["lowrank", "eval", folder, "--data", data, "--max-tokens", str(tokens), "--json"])
            ["perplexity"] for kind, data in (("code", "stdlib"), ("prose", "stdlib-prose"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, demo or a folder")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()
    model = args.model
    if model == "smollm2":
        from smollm2 import smollm2_path

        model = str(smollm2_path())
    rows = [{"method": "base", "calib": "-", **perplexities(model, args.eval_tokens)}]
    with tempfile.TemporaryDirectory() as tmp:
        for calib in ("stdlib", "stdlib-mix"):
            for method in ("gptq4", "decompose0.8"):
                out = str(Path(tmp) / f"{method}-{calib}")
                common = ["-o", out, "--calib", calib, "--calib-samples", str(args.calib_samples), "--json"]
                if method == "gptq4":
                    made = run(["lowrank", "quantize", model, *common, "--skip-eval"])
                else:
                    made = run(["lowrank", "decompose", model, "--params-ratio", "0.8", *common])
                rows.append({"method": method, "calib": calib, **perplexities(out, args.eval_tokens),
                             "seconds": made["_seconds"]})
    base = rows[0]
    print(f"\n{'method':<14}{'calib':<12}{'code ppl':>10}{'prose ppl':>11}{'code +%':>9}{'prose +%':>10}")
    for r in rows:
        print(f"{r['method']:<14}{r['calib']:<12}{r['code']:>10.3f}{r['prose']:>11.3f}"
              f"{100 * (r['code'] / base['code'] - 1):>9.1f}{100 * (r['prose'] / base['prose'] - 1):>10.1f}")
    name = Path(args.model).name if args.model not in ("smollm2", "demo") else args.model
    out = HERE / "results" / f"calib_mix-{name}.json"
    out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Build the bundled demo model: a small StarCoder-architecture (GPTBigCode) LM trained on Python stdlib source.

Run it from the repository root (CPU only, no network needed):

    python scripts/train_demo_model.py

On an idle 2-core x86 machine (torch.set_num_threads(2)) it takes about 23 minutes of wall time: a few seconds
to train the tokenizer, ~10 s to tokenize the training text, ~21 minutes of training (640 steps at ~2 s, about
4,000 tokens/s), and about a minute of evaluation. A loaded machine stretches that several-fold: the shipped run
shared its 2 cores with test suites and took 71 minutes (same step count, same result). It writes

    lowrank_cli/demo_model/     config.json, generation_config.json, model.safetensors, tokenizer.json,
                                tokenizer_config.json, training.json (the figures below)
    scripts/DEMO_MODEL.md       a short write-up with the loss table

Why this model exists: the toolkit's tests, docs and `--help` examples need a causal LM that ships inside the
package (no download), loads in a second, and is a *real* language model, so that compressing it with low-rank
methods has a measurable, gradual effect on perplexity. A random or barely-trained model is the wrong demo:
either nothing matters (noise) or every direction matters (no redundancy to remove).

Everything is seeded (seed 0) and the run length is a fixed step count, not a time budget, so a rerun on the
same machine and library versions gives the same weights; a different CPU or BLAS may differ in the last bits.

Data: `lowrank_cli.data.sources.load_documents("stdlib", part=...)` splits the interpreter's standard library by
a stable hash of each file's path into "eval" (10%), "calib" (10%) and "train" (80%). The tokenizer and the
model see only "train"; training progress is monitored on a slice of the train stream that is never trained on,
so the "eval" split is touched exactly once, for the final held-out figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# The script lives in scripts/; make `lowrank_cli` importable without installing the package.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lowrank_cli.data.sources import load_documents  # noqa: E402
from lowrank_cli.data.windows import cut_windows, fingerprint, token_stream, windows_from_documents  # noqa: E402

EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------------------------------------
# The configuration that builds the shipped model. The run-length and optimizer values are also the defaults of
# command-line flags, so short trial runs (--steps 20 --out /tmp/x --writeup '') use the same code path.
SEED = 0
VOCAB_SIZE = 4096  # small enough that the tied embedding (4096 x 256) is a quarter of the parameters
N_EMBD, N_LAYER, N_HEAD, N_INNER = 256, 4, 8, 1024
N_POSITIONS = 512  # the training window: the model is only trusted up to 512 tokens
SEQ_LEN = 512
BATCH = 16  # windows per optimizer step: 16 x 512 = 8192 tokens. With only ~5M tokens to spend, more and
#             smaller steps learn more per token than fewer 16k-token ones (the loss is far above the regime
#             where large batches pay off).
MICRO = 8  # windows per forward/backward (gradient accumulation); on 2 cores 8 ran ~4,000 tokens/s, 32 ~3,300
STEPS = 640  # ~5.2M tokens, a little under one pass over the ~7M training tokens; measured ~2 s per step
WARMUP = 40
LR, MIN_LR = 3e-3, 3e-4  # cosine from LR down to MIN_LR; a 4M-parameter model takes a high rate
WEIGHT_DECAY = 0.1  # decoupled (AdamW); keeps unused directions small, so low-rank factorization has slack
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
LOG_EVERY = 40
MONITOR_WINDOWS = 32  # windows held out of the train stream for the loss table (16k tokens)
EVAL_SEQ_LEN = 512
EVAL_TOKENS = 131072  # final held-out figure: 256 windows of the "eval" split
THREADS = 2
# -----------------------------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "lowrank_cli" / "demo_model"))
    p.add_argument("--writeup", default=str(REPO / "scripts" / "DEMO_MODEL.md"),
                   help="the Markdown write-up ('' to skip)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--micro", type=int, default=MICRO)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--min-lr", type=float, default=MIN_LR)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--log-every", type=int, default=LOG_EVERY)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    # CPU kernels are deterministic already; this makes any future nondeterministic op an error, not a surprise.
    torch.use_deterministic_algorithms(True)


# ---- tokenizer ---------------------------------------------------------------------------------------------

def train_tokenizer(docs: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE trained on the training documents only.

    Byte-level means every string is encodable (no unknown token); the GPT-2 pre-tokenizer regex keeps runs of
    spaces together, which matters for Python indentation. The single special token doubles as bos/eos/pad,
    like GPT-2 and StarCoder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones train never shows
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    # No model_max_length: the toolkit tokenizes whole documents before cutting windows, and a 512 limit would
    # only print "sequence length is longer than the specified maximum" warnings.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=EOT)


# ---- evaluation --------------------------------------------------------------------------------------------

@torch.no_grad()
def nll_sum(model, windows: torch.Tensor, micro: int = 16) -> tuple[float, int]:
    """Summed NLL (nats) of every predicted token (seq_len - 1 per window) and the token count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], micro):
        x = windows[i:i + micro]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total, count


def perplexity(model, windows: torch.Tensor) -> float:
    total, count = nll_sum(model, windows)
    return math.exp(total / count)


def unigram_perplexity(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """The baseline a language model has to beat: token frequencies from train, add-one smoothed, scored on
    exactly the tokens the model predicts (positions 1..seq_len-1 of each window)."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[windows[:, 1:].reshape(-1)].mean().item())


# ---- training ----------------------------------------------------------------------------------------------

def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step (step counts from 0)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    # nanoGPT's rule: decay every matrix (linears, embeddings), never biases or LayerNorm gains. Decaying the
    # matrices is what leaves their unused directions near zero, i.e. what makes the demo compressible.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=BETAS, eps=1e-8)


def main() -> None:
    args = parse_args()
    assert args.batch % args.micro == 0, "--batch must be a multiple of --micro"
    torch.set_num_threads(args.threads)  # the reference timing; more threads is faster but not bit-identical
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    seed_everything(args.seed)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM

    # 1. Tokenizer, on the "train" documents only (the eval/calib files must not shape the vocabulary either).
    train_docs = load_documents("stdlib", part="train")
    t0 = time.time()
    tokenizer = train_tokenizer(train_docs, VOCAB_SIZE)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    tok_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    print(f"tokenizer: {len(tokenizer)} tokens, {EOT} = {eot_id}, {time.time() - t0:.1f}s, sha256 {tok_hash}")

    # 2. The training stream, in the project's own protocol (documents in a seeded order, joined by a blank
    # line), so that training text looks exactly like what `lowrank` later evaluates on.
    t0 = time.time()
    stream = token_stream(tokenizer, train_docs, max_tokens=10**12, seed=args.seed)
    windows = cut_windows(stream, SEQ_LEN)
    # Shuffle windows once; the last MONITOR_WINDOWS are never trained on and give the loss table's val column.
    g = torch.Generator().manual_seed(args.seed)
    windows = windows[torch.randperm(windows.shape[0], generator=g)]
    monitor, windows = windows[-MONITOR_WINDOWS:], windows[:-MONITOR_WINDOWS]
    print(f"train stream: {stream.numel():,} tokens ({sum(map(len, train_docs)) / stream.numel():.2f} "
          f"chars/token), {windows.shape[0]:,} windows of {SEQ_LEN}, {time.time() - t0:.1f}s")

    eval_windows = windows_from_documents(tokenizer, load_documents("stdlib", part="eval"),
                                          seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_TOKENS, seed=0)
    unigram_ppl = unigram_perplexity(stream, eval_windows, len(tokenizer))
    print(f"eval: {eval_windows.shape[0]} windows x {EVAL_SEQ_LEN}, unigram ppl {unigram_ppl:.2f}")

    # 3. The model. multi_query=True is StarCoder's attention: one shared key/value head, so c_attn maps
    # n_embd -> n_embd + 2 * head_dim. No dropout: less than one epoch over the data, nothing to regularize
    # against but the weight decay. bos/eos/pad point at <|endoftext|> (the default 50256 is outside the vocab).
    config = GPTBigCodeConfig(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
        n_inner=N_INNER, multi_query=True, activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, tie_word_embeddings=True,
    )
    model = GPTBigCodeForCausalLM(config)
    model.generation_config.pad_token_id = eot_id
    n_params = sum(p.numel() for p in model.parameters())  # the tied lm_head counts once
    print(f"model: {n_params:,} parameters")
    model.train()
    opt = make_optimizer(model, args)

    # 4. Train: a fixed number of steps of `batch` windows each, walking the shuffled windows in order and
    # reshuffling only if we run out (the shipped run stays under one epoch, so no window repeats).
    tokens_per_step = args.batch * SEQ_LEN
    order = torch.arange(windows.shape[0])
    cursor, epoch = 0, 0
    log, recent = [], []
    t_train = time.time()
    for step in range(args.steps):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        if cursor + args.batch > windows.shape[0]:
            epoch += 1
            order = torch.randperm(windows.shape[0], generator=g)
            cursor = 0
        batch = windows[order[cursor:cursor + args.batch]]
        cursor += args.batch
        loss_sum = 0.0
        for i in range(0, args.batch, args.micro):
            x = batch[i:i + args.micro]
            loss = model(input_ids=x, labels=x).loss  # mean over the micro-batch's predicted tokens
            (loss * (args.micro / args.batch)).backward()
            loss_sum += loss.item() * args.micro / args.batch
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss_sum)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or step == 0:
            total, count = nll_sum(model, monitor)
            row = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "lr": lr,
                   "train_loss": round(sum(recent) / len(recent), 4), "val_loss": round(total / count, 4),
                   "grad_norm": round(grad_norm, 2), "elapsed_s": round(time.time() - t_train)}
            log.append(row)
            recent = []
            print(f"step {row['step']:5d} | lr {lr:.2e} | train {row['train_loss']:.4f} | val "
                  f"{row['val_loss']:.4f} (ppl {math.exp(row['val_loss']):.2f}) | gnorm {grad_norm:.2f} | "
                  f"{row['elapsed_s']:.0f}s ({row['tokens'] / row['elapsed_s']:.0f} tok/s)", flush=True)
    train_s = time.time() - t_train
    final_train_loss = log[-1]["train_loss"]

    # 5. Held-out figure on the "eval" split, then save and prove that the saved folder reproduces it.
    model.eval()
    ppl = perplexity(model, eval_windows)
    print(f"held-out ppl {ppl:.3f} vs unigram {unigram_ppl:.2f} ({unigram_ppl / ppl:.1f}x lower)")

    # float32 fits the 25 MB budget (~15.5 MB), so keep full precision: it is the reference the toolkit's
    # compressed models are compared against. One shard, so the folder is a single model.safetensors.
    model.save_pretrained(out, max_shard_size="200MB")
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # save_pretrained writes the weights 0600; a package file must be world-readable
        f.chmod(0o644)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    re_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    re_windows = windows_from_documents(re_tok, load_documents("stdlib", part="eval"),
                                        seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_TOKENS, seed=0)
    assert torch.equal(re_windows, eval_windows), "the saved tokenizer tokenizes differently"
    re_ppl = perplexity(reloaded, re_windows)
    print(f"reloaded from {out}: ppl {re_ppl:.3f}")
    assert abs(re_ppl - ppl) <= 1e-4 * ppl, f"reloaded model disagrees: {re_ppl} vs {ppl}"

    wall_s = time.time() - t_start
    folder_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "training.json")
    figures = {
        "architecture": "GPTBigCodeForCausalLM (multi_query=True)",
        "seed": args.seed,
        "parameters": n_params,
        "config": {"vocab_size": len(tokenizer), "n_embd": N_EMBD, "n_layer": N_LAYER, "n_head": N_HEAD,
                   "n_inner": N_INNER, "n_positions": N_POSITIONS},
        "training": {"data": "stdlib part=train", "train_stream_tokens": stream.numel(),
                     "steps": args.steps, "batch_windows": args.batch, "seq_len": SEQ_LEN,
                     "tokens_per_step": tokens_per_step, "tokens_seen": args.steps * tokens_per_step,
                     "epochs": round(args.steps * tokens_per_step / (windows.shape[0] * SEQ_LEN), 3),
                     "optimizer": f"AdamW betas={BETAS} wd={args.weight_decay} clip={GRAD_CLIP}",
                     "lr": f"warmup {args.warmup} then cosine {args.lr:g} -> {args.min_lr:g}",
                     "final_train_loss": round(final_train_loss, 4),
                     "train_wall_s": round(train_s, 1), "wall_s": round(wall_s, 1), "threads": args.threads},
        "eval": {"data": "stdlib part=eval", "seq_len": EVAL_SEQ_LEN, "windows": eval_windows.shape[0],
                 "predicted_tokens": eval_windows.shape[0] * (EVAL_SEQ_LEN - 1),
                 "fingerprint": fingerprint(eval_windows),
                 "perplexity": round(ppl, 4), "unigram_perplexity": round(unigram_ppl, 4)},
        "tokenizer_sha256": tok_hash,
        "log": log,  # the loss table: train = mean over the steps since the previous row, val = held-out slice
        "folder_bytes": folder_bytes,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
    }
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    if args.writeup:
        write_markdown(Path(args.writeup), figures, log)
    print(f"done in {wall_s / 60:.1f} min; {out} holds {folder_bytes / 1e6:.1f} MB")


# ---- write-up ----------------------------------------------------------------------------------------------

KEEP_BEGIN, KEEP_END = "<!-- keep: compressibility -->", "<!-- /keep -->"


def write_markdown(path: Path, f: dict, log: list[dict]) -> None:
    """Regenerate the write-up; the compressibility section (measured by hand, see the note in it) is kept."""
    kept = ""
    if path.exists():
        old = path.read_text()
        if KEEP_BEGIN in old and KEEP_END in old:
            kept = old[old.index(KEEP_BEGIN):old.index(KEEP_END) + len(KEEP_END)]
    if not kept:
        kept = f"{KEEP_BEGIN}\n## Compressibility check\n\n(not measured yet)\n{KEEP_END}"
    t, e, c = f["training"], f["eval"], f["config"]
    rows = "\n".join(
        f"| {r['step']} | {r['tokens'] / 1e6:.2f}M | {r['lr']:.2e} | {r['train_loss']:.3f} | "
        f"{r['val_loss']:.3f} | {math.exp(r['val_loss']):.2f} | {r['elapsed_s'] / 60:.1f} |"
        for r in log
    )
    text = f"""# The bundled demo model

`lowrank_cli/demo_model/` is a small code model built by `scripts/train_demo_model.py`
(`python scripts/train_demo_model.py`, about 23 minutes on an idle 2-core CPU). It is the toolkit's
default model for tests, docs and examples: it ships in the package, loads offline in about a second, and is
a real language model, so low-rank compression has a measurable effect on it.

## What it is

- Architecture: `GPTBigCodeForCausalLM` (StarCoder's, `multi_query=True`), {f['parameters']:,} parameters
  (n_embd {c['n_embd']}, n_layer {c['n_layer']}, n_head {c['n_head']}, n_inner {c['n_inner']},
  n_positions {c['n_positions']}, tied input/output embedding), float32 weights.
- Tokenizer: its own byte-level BPE (`tokenizers`), {c['vocab_size']} tokens, `<|endoftext|>` (id 0) as
  bos/eos/pad. Saved as an HF tokenizer, so `AutoTokenizer.from_pretrained` works offline.
- Data: the running interpreter's Python standard library source, `load_documents("stdlib",
  part="train")` only. The toolkit's default evaluation (`part="eval"`) and calibration (`part="calib"`)
  files are disjoint from it by construction (hash of the file path); the tokenizer never saw them either.
- Folder size: {f['folder_bytes'] / 1e6:.1f} MB (budget 25 MB).

## Training

- Seed {f['seed']}; {t['steps']} steps of {t['batch_windows']} windows x {t['seq_len']} tokens =
  {t['tokens_per_step']:,} tokens per step, {t['tokens_seen']:,} tokens seen ({t['epochs']} of an epoch
  over the {t['train_stream_tokens']:,}-token training stream; no window repeats).
- {t['optimizer']} (decay on matrices only); {t['lr']}; no dropout.
- This run: {t['wall_s'] / 60:.1f} min wall time, {t['train_wall_s'] / 60:.1f} min of it training
  ({t['tokens_seen'] / t['train_wall_s']:,.0f} tokens/s), {t['threads']} threads, torch {f['versions']['torch']}.
  Wall time depends on how busy the machine is (about 4,000 tokens/s, ~21 min of training, when idle); the
  weights do not.

"val" is held out of the training stream (32 windows, never trained on); "train" is the mean loss over the
steps since the previous row. Losses are nats per token.

| step | tokens | lr | train loss | val loss | val ppl | minutes |
|---:|---:|---:|---:|---:|---:|---:|
{rows}

Final train loss {t['final_train_loss']:.3f}.

## Held-out perplexity

On the evaluation split (`part="eval"`, {e['windows']} non-overlapping windows of {e['seq_len']} tokens,
{e['predicted_tokens']:,} predicted tokens, token-weighted NLL, fingerprint `{e['fingerprint']}`):

| model | perplexity |
|---|---:|
| demo model | **{e['perplexity']:.2f}** |
| unigram baseline (train token frequencies, add-one smoothing) | {e['unigram_perplexity']:.2f} |

The model is {e['unigram_perplexity'] / e['perplexity']:.1f}x below the unigram baseline. The saved folder was
reloaded with `AutoModelForCausalLM.from_pretrained(..., dtype=torch.float32)` and `AutoTokenizer` and gave
the same perplexity.

{kept}
"""
    path.write_text(text)


if __name__ == "__main__":
    main()

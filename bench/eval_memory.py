"""Peak memory and time of one validation-loss evaluation: the logits a chunk of positions at a time (qtraj's
`cross_entropy`) against every logit of a batch at once (how qtraj computed it before, kept here as the baseline).

    .venv/bin/python bench/eval_memory.py [--blocks 4] [--seq-len 512]

Each measurement runs in a fresh process: it builds a tiny random model, resets the kernel's peak-RSS counter
(/proc/self/clear_refs), evaluates, and reports the peak resident memory above what the model and the blocks already
held. Two models: a tiny Llama with a 49,152-token vocabulary (SmolLM2's) and a tiny Gemma 3 with 262,144 (Gemma 3's
real vocabulary, where the logits dwarf a small model's weights). On a GPU the same would read
torch.cuda.max_memory_allocated; this benchmark measures the CPU path, which is what runs here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

MODELS = {
    "Llama, vocabulary 49,152": ("LlamaForCausalLM", 49_152),
    "Gemma 3, vocabulary 262,144": ("Gemma3ForCausalLM", 262_144),
}

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, torch, transformers
    sys.path.insert(0, ".")
    from tests.architectures import tiny_config
    from qtraj.evaluation import cross_entropy

    architecture, mode = sys.argv[1], sys.argv[3]
    vocabulary, blocks, seq_len = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(architecture, vocabulary,
                                                                       max_position_embeddings=seq_len + 1)).eval()
    tokens = np.random.default_rng(0).integers(0, vocabulary, size=(blocks, seq_len + 1))

    def full_logits_loss():  # qtraj's loss before chunking: a batch's logits, then their float32 copy, at once
        total = 0.0
        with torch.inference_mode():
            batch = torch.from_numpy(tokens.astype(np.int64))
            logits = model(input_ids=batch[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum").double().item()
        return total / batch[:, 1:].numel()

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    evaluate = full_logits_loss if mode == "full" else lambda: cross_entropy(model, tokens, blocks).loss
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
    before = rss_kib("VmRSS:")
    start = time.perf_counter()
    loss = evaluate()
    seconds = time.perf_counter() - start
    print(json.dumps({"loss": loss, "seconds": seconds, "peak_mib": (rss_kib("VmHWM:") - before) / 1024,
                      "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}))
""")


def measure(architecture: str, vocabulary: int, mode: str, blocks: int, seq_len: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, architecture, str(vocabulary), mode, str(blocks), str(seq_len)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks in the one batch evaluated (default 4)")
    parser.add_argument("--seq-len", type=int, default=512, help="positions per block (default 512)")
    args = parser.parse_args()
    logits_mib = args.blocks * args.seq_len * 4 / 2**20
    print(f"one batch of {args.blocks} x {args.seq_len} positions; peak RSS above the model and blocks, MiB")
    print(f"{'model':30s} {'weights':>8s} {'1 copy of fp32 logits':>22s} {'full: peak':>11s} {'chunked: peak':>14s} "
          f"{'full: s':>8s} {'chunked: s':>11s} {'loss difference':>16s}")
    for name, (architecture, vocabulary) in MODELS.items():
        full = measure(architecture, vocabulary, "full", args.blocks, args.seq_len)
        chunked = measure(architecture, vocabulary, "chunked", args.blocks, args.seq_len)
        print(f"{name:30s} {full['weights_mib']:8.0f} {logits_mib * vocabulary:22.0f} {full['peak_mib']:11.0f} "
              f"{chunked['peak_mib']:14.0f} {full['seconds']:8.2f} {chunked['seconds']:11.2f} "
              f"{abs(full['loss'] - chunked['loss']):16.2e}")


if __name__ == "__main__":
    main()

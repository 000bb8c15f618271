"""Expected cost of one TRACE training step on Llama-3.2-1B, from a measured forward/backward of the
real architecture (random weights, CPU, a few tokens).

The config is Llama-3.2-1B's published one (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192,
vocab 128256, tied embeddings, RoPE θ 500000 with llama3 scaling). A full 1B model in fp32 with
gradients needs ~10 GB here, so by default the script builds the model with ``--layers`` 2 and 4
decoder layers (+ the full embedding / LM head), measures a forward/backward of the adapter's loss
(answer-token cross-entropy, gradients for the mergeable weights only: embeddings and head frozen,
as the ``trace`` benchmark's default), fits time = fixed + per_layer · layers, and extrapolates to
16 layers (``--layers 16`` measures the whole model where memory allows). Per-token cost is taken
from ``--tokens`` tokens; a TRACE step (batch 8, up to 2048 tokens per sequence) is extrapolated
linearly in tokens (the attention's quadratic term is ~6% of the FLOPs at 2048 tokens for this
model, reported separately) and as a FLOP count for GPU estimates.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/trace_step_cost.py [--threads 1] [--tokens 16]
        [--layers 2,4] [--repeats 3] [--seq-len 2048] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import cl_merge  # noqa: E402,F401  (torchvision shim before transformers imports torchvision)

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   bos_token_id=128000, eos_token_id=128009)


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_32_1B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # random weights (the values do not matter for timing); cheap init
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, b in model.named_buffers():
            if "inv_freq" in name:
                model.model.rotary_emb.__init__(config)  # recompute RoPE frequencies
                break
    model.eval()
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
    return model, config


def step_seconds(model, tokens: int, repeats: int) -> float:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    labels = ids.clone()
    labels[:, : tokens // 2] = -100  # loss on the "answer" half
    times = []
    for _ in range(repeats + 1):  # first call warms up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def flops_per_step(config, layers: int, seq: int, batch: int) -> dict:
    d, f, h, kv, hd, v = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                          config.num_key_value_heads, config.head_dim, config.vocab_size)
    per_layer_params = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    tokens = seq * batch
    dense = 6 * per_layer_params * layers * tokens  # forward 2, backward 4 (weights trained)
    head = 4 * d * v * tokens  # forward 2 + input-gradient 2 (head frozen)
    attention = 3 * 4 * layers * h * hd * seq * seq * batch / 2  # QK^T and AV, causal half, fwd+bwd
    return {"dense": dense, "head": head, "attention": attention, "total": dense + head + attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measured = {}
    config = None
    for n in [int(x) for x in args.layers.split(",")]:
        t0 = time.perf_counter()
        model, config = build(n)
        built = time.perf_counter() - t0
        measured[n] = step_seconds(model, args.tokens, args.repeats)
        print(f"{n:2d} layers: build {built:.1f} s, forward+backward of {args.tokens} tokens "
              f"{measured[n]:.3f} s (median of {args.repeats})")
        del model
    full = LLAMA_32_1B["num_hidden_layers"]
    ns = sorted(measured)
    if full in measured:
        t_full, how = measured[full], "measured"
    elif len(ns) >= 2:
        per_layer = (measured[ns[-1]] - measured[ns[0]]) / (ns[-1] - ns[0])
        fixed = measured[ns[0]] - per_layer * ns[0]
        t_full, how = fixed + per_layer * full, (f"extrapolated: {fixed:.3f} s fixed (embeddings, LM head) + "
                                                  f"{per_layer:.3f} s/layer x {full}")
    else:
        t_full, how = measured[ns[0]] * full / ns[0], "extrapolated proportionally from one depth"
    per_token = t_full / args.tokens
    step_tokens = args.seq_len * args.batch
    flops = flops_per_step(config, full, args.seq_len, args.batch)
    flops_measured = flops_per_step(config, full, args.tokens, 1)
    print(f"Llama-3.2-1B (16 layers), {args.tokens} tokens: {t_full:.3f} s per forward+backward ({how})")
    print(f"  = {per_token * 1e3:.1f} ms per token on {args.threads} CPU thread(s), "
          f"{flops_measured['total'] / t_full / 1e9:.1f} GFLOP/s achieved")
    print(f"TRACE step (batch {args.batch} x {args.seq_len} tokens = {step_tokens} tokens, Adam/C-FT):")
    print(f"  CPU, linear in tokens: {per_token * step_tokens / 3600:.2f} h per step "
          f"(x2 for SA-BCD/SAM: two forward/backward passes)")
    print(f"  FLOPs: {flops['total'] / 1e12:.1f} TFLOP per step (dense {flops['dense'] / 1e12:.1f}, "
          f"LM head {flops['head'] / 1e12:.1f}, attention {flops['attention'] / 1e12:.1f})")
    for mfu in (0.3, 0.4):
        print(f"  H100/H200 bf16 (989 TFLOP/s dense peak) at {int(mfu * 100)}% MFU: "
              f"{flops['total'] / (989e12 * mfu):.2f} s per step (assumption, not measured)")


if __name__ == "__main__":
    main()

"""Tiny MergeBench stand-ins: a randomly initialised base and five domain "experts" in HF format."""

from pathlib import Path

import torch

DOMAINS = ("instruction", "math", "multilingual", "coding", "safety")


def write_tiny_mergebench(root: Path, hidden: int = 32, layers: int = 2, domains=DOMAINS):
    """base/ and <domain>/ folders (save_pretrained, safetensors). The experts differ from the base by
    noise of different scales; 'math' is stored in bfloat16 and 'coding' sharded, to cover both."""
    from cl_merge.benchmarks.trace.fixtures import byte_tokenizer, tiny_llama

    root = Path(root)
    tok = byte_tokenizer()
    base = tiny_llama(len(tok), 0, hidden=hidden, layers=layers)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, domain in enumerate(domains):
        expert = tiny_llama(len(tok), 0, hidden=hidden, layers=layers)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_((0.005 * (i + 1)) * torch.randn(p.shape, generator=g))
        kwargs = {"max_shard_size": "20KB"} if domain == "coding" else {}
        if domain == "math":
            expert = expert.to(torch.bfloat16)
        expert.save_pretrained(root / domain, **kwargs)
        tok.save_pretrained(root / domain)
    return root

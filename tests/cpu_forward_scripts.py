"""What the engine runs through a forward, as a script: shared by the CPU fast forward tests (fp32/bf16 and
int8) in tests/model."""
import torch

PATTERN = "FSSFSF"


def run_script(forward, steps):
    """steps: (tokens (B, T), starts, slots) -> list of (B, V) logits at each row's last position."""
    out = []
    for tokens, starts, slots in steps:
        at = torch.full((tokens.shape[0],), tokens.shape[1] - 1)
        out.append(forward(tokens, starts, slots, at))
    return out


def engine_like_steps(gen, vocab):
    """Two requests prefilled in chunks (slots 2 and 0; the second chunk crosses top-k = 8), then batched
    decode positions for both plus a third request, of different lengths."""
    t = lambda *shape: torch.randint(0, vocab, shape, generator=gen)
    steps = [(t(1, 5), [0], [2]), (t(1, 9), [5], [2]),      # 14 tokens in slot 2: past top-k
             (t(1, 6), [0], [0]),                            # 6 tokens in slot 0: dense
             (t(1, 3), [0], [1])]                            # 3 tokens in slot 1
    lens = [14, 6, 3]
    for _ in range(6):                                       # slot 0 crosses top-k during decode
        steps.append((t(3, 1), list(lens), [2, 0, 1]))
        lens = [n + 1 for n in lens]
    steps.append((t(1, 1), [lens[1]], [0]))                  # one-request decode
    return steps


GREEDY_PROMPTS = [[3, 4, 5], list(range(10, 30)), [7] * 11]   # short of top-k = 8 and past it


def greedy_engine_outputs(model, **engine_options):
    """(the engine, each GREEDY_PROMPTS request's 12 greedy tokens), the requests decoded together through an
    Engine stepped by hand (slot cache, chunks of 8)."""
    from indexcache.engine import Engine
    from indexcache.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    engine = Engine(model, pattern=PATTERN, max_batch_size=4, max_model_len=64, chunk_size=8, **engine_options)
    reqs = [engine.submit(p, params, lambda chunk: None) for p in GREEDY_PROMPTS]
    while engine.step():
        pass
    return engine, [r.output for r in reqs]

"""Drive an `Engine` by hand (no thread), as the engine tests in tests/serving do.

(Here rather than in tests/serving: pytest runs with --import-mode=importlib, and tests/conftest.py puts
this directory on sys.path for shared helpers.)
"""


def run_all(engine, jobs, watch=None, steps=None):
    """jobs: list of (step, prompt, params, pattern|None), each submitted just before that step (a pattern
    first switches the engine to it); runs until nothing is left. watch(engine) is called after every step.
    Returns {job index: the chunks it received}; `steps`, a dict, gets {job index: the step of each chunk}."""
    chunks = {i: [] for i in range(len(jobs))}
    at = steps if steps is not None else {}
    step, pending = 0, sorted(range(len(jobs)), key=lambda i: jobs[i][0])

    def receiver(i):
        at[i] = []
        return lambda chunk: (chunks[i].append(chunk), at[i].append(step))

    while True:
        while pending and jobs[pending[0]][0] <= step:
            i = pending.pop(0)
            _, prompt, params, pattern = jobs[i]
            if pattern is not None:
                engine.set_pattern(pattern, version=step)
            engine.submit(prompt, params, receiver(i))
        worked = engine.step()
        if watch is not None:
            watch(engine)
        step += 1
        if not worked and not pending:
            return chunks


def tokens(chunks):
    """The token ids a request received, in order."""
    return [c.token_id for c in chunks if c.token_id is not None]

"""The library API: one function per job, each returning a result object. The CLI is a thin layer over it.

    from lowrank_cli.api.evaluate import evaluate
    result = evaluate("demo", max_tokens=4096)
    print(result.perplexity)
"""

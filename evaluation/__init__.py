"""What evaluate.py is made of: dense and AccelAes images of a prompt file, scored, compared.

    configs.py     the named AccelAes configurations (--configs): the full method and the paper's ablations
    metric_flags.py  one flag per metric file of metrics.registry; which metrics run, and why the others not
    generate.py    the images, through runs.run_jobs (batches, torchrun, resume), and the mask pictures
    scoring.py     every image scored by every metric that runs
    results.py     the image pairs (results.jsonl), their means over prompts and paired differences (summary.json)
    tables.py      the summary as the paper's tables: numbers formatted once, for Markdown and HTML
    report.py      report.html: the tables, then dense, AccelAes and the mask of every prompt side by side
"""

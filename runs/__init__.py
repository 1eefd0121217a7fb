"""Many prompts, many seeds, many GPUs: what `sample.py --prompts FILE --output-dir DIR` runs.

    prompts.py      the prompt file (text or JSON Lines) read and checked; jobs = prompt x seed,
                    each with a file name that never changes
    outputs.py      the output folder: PNGs written whole, manifest.jsonl, resume, the ranks' merge
    distributed.py  torchrun: each process's rank, device and process group
    progress.py     one progress line per process
    runner.py       run_jobs: the jobs in batches through the Pipeline interface

    with data_parallel(device) as process:
        pipeline = ...load onto process.device...
        jobs = make_jobs(read_prompts("prompts.jsonl"), seed_list(images_per_prompt=4))
        summary = run_jobs(pipeline, jobs, "out/", settings=settings, height=1024, width=1024,
                           batch_size=4, accelerator=lambda: AccelAes.create(config, embed), process=process)
"""

from .distributed import Process, data_parallel
from .outputs import MANIFEST, OutputFolder
from .progress import Progress
from .prompts import Job, PromptFileError, PromptLine, make_jobs, read_prompts, seed_list
from .runner import Summary, run_jobs

__all__ = ["Job", "MANIFEST", "OutputFolder", "Process", "Progress", "PromptFileError", "PromptLine", "Summary",
           "data_parallel", "make_jobs", "read_prompts", "run_jobs", "seed_list"]

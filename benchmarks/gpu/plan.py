"""What the GPU runner runs, in one place: its stages and their cases.

Adding a case is one line: a benchmark (bench.py options) in :data:`SPEED_RUNS` or
:data:`EXTRA`, a training run in :data:`TRAIN_RUNS`, a pytest selection in :data:`EXTRA`.
Each entry's ``tiny`` options replace the sizes for ``--dry-run`` (CPU, interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    number: int
    name: str  # benchmarks/gpu/<name>.py, whose run(record, args) is the stage
    share: float  # of the total budget; unused time passes on to the next stages
    what: str


STAGES = [
    Stage(1, "environment", 0.08, "GPU, driver and versions; every kernel compiled and checked on small inputs"),
    Stage(2, "correctness", 0.30, "the CUDA tests at real sizes (N up to 65536, D = 768, every dtype and option)"),
    Stage(3, "speed", 0.32, "fastcl against dense, torch.compile and the peers; fastcl alone up to N = 1,048,576"),
    Stage(4, "training", 0.10, "SimCSE training steps, all-MiniLM-L6-v2, batch 512 in chunks: sentences/s, memory"),
    Stage(5, "extra", 0.20, "what time is left: NT-Xent, groups, other D, the whole test suite on CUDA"),
]


@dataclass(frozen=True)
class Bench:
    """A bench.py run: ``options`` on the GPU, ``tiny`` added for a dry run."""

    name: str
    options: str
    share: float = 1.0  # of its stage's time, relative to the other entries left
    tiny: str = ""


@dataclass(frozen=True)
class Script:
    """A benchmark script of benchmarks/ run in its own process (``options`` on the GPU,
    ``tiny`` instead for a dry run), its results written under ``<out>/<n>-<stage>-<name>/``."""

    script: str
    name: str
    options: str
    share: float = 1.0
    tiny: str = ""
    #: pass the runner's ``--model`` on as ``--model`` (a machine without the model package)
    model: bool = False


@dataclass(frozen=True)
class Pytest:
    """A pytest run (GPU only: the CPU suite has its own CI)."""

    name: str
    options: str
    share: float = 1.0


#: Appended to every Bench of a dry run (a later option overrides an earlier one); a dry
#: run also leaves out torch.compile (minutes of C++ compilation on a CPU) and, where an
#: entry names none, times fastcl (each backward strategy in the interpreter) and dense.
TINY = "--device cpu --sizes 16,24 --dim 16 --dtype fp32 --repeats 2 --min-repeats 2 --warmup 1 --case-budget-s 0.2 --no-plots"
TINY_IMPLS = "fastcl,{strategies},dense"
#: fastcl (the default choice, then each backward strategy) against the others.
FASTCL = "fastcl,{strategies}"

# Stage 3. The 16384 and 65536 rows of "main" are what the targets are read from.
SPEED_RUNS = [
    Bench("main", f"--sizes 4096,16384,65536 --dim 768 --dtype bf16 --impls {FASTCL},dense,compiled,memeff,inf-cl,cce",
          share=0.5),
    Bench("large", "--sizes 262144,1048576 --dim 768 --dtype bf16 --impls fastcl --min-repeats 1 --repeats 5 "
          "--max-call-s 30",
          share=0.25, tiny="--sizes 24,40"),
    Bench("hard", f"--hard --sizes 4096,16384,65536 --dim 768 --dtype bf16 --impls {FASTCL},dense,compiled,inf-cl,cce",
          share=0.25),
]

# Stage 4: python -m fastcl.train runs (options added to the common ones in training.py).
TRAIN_RUNS = [
    ("fastcl", "--loss-backend auto"),
    ("dense", "--loss-backend reference"),
]

# Stage 5, in priority order; each gets an equal share of what is left.
EXTRA = [
    Bench("nt_xent", "--loss nt_xent --sizes 4096,16384,65536 --dim 768 --dtype bf16", tiny="--sizes 8,12"),
    Bench("groups", "--loss groups --group-size 128 --sizes 4096,16384,65536 --dim 768 --dtype bf16",
          tiny="--group-size 8"),
    # The loss family: K = 7 hard negatives per anchor (M = 8N), and Qwen3 / GTE (four
    # directions in one softmax, margin 0.1), against the dense equivalent and its compiled form.
    Bench("hard7", "--hard-k 7 --sizes 4096,16384 --dim 768 --dtype bf16 --impls fastcl,dense,compiled",
          tiny="--sizes 8,12"),
    Bench("gte", "--gte --hard --sizes 4096,16384 --dim 768 --dtype bf16 --impls fastcl,dense,compiled",
          tiny="--sizes 8,12"),
    # GISTEmbed / DCLR: the guide mask, its products at full precision beside the bf16 logits.
    Bench("guide", "--hard --guide-dim 384 --sizes 4096,16384 --dim 768 --dtype bf16 "
          "--impls fastcl,fastcl-slab,fastcl-workspace,dense,compiled", tiny="--sizes 8,12 --guide-dim 8"),
    # The sentence-transformers losses' loss step (embeddings in, gradients out): fastcl's
    # classes against sentence-transformers' own (MNRL and its cached form; GISTEmbedLoss).
    Script("bench_sentence_transformers.py", "st",
           "--device cuda --sizes 4096,16384,65536 --dims 768 --negatives 0,7 --max-peak-gib 100 "
           "--max-call-seconds 20 --max-n st_cached=16384,fastcl_cached=65536",
           tiny="--device cpu --sizes 8,12 --dims 16 --negatives 0,2 --repeats 1 --threads 1"),
    Script("bench_sentence_transformers.py", "st-gist",
           "--loss gist --device cuda --sizes 1024,4096,16384 --dims 768 --negatives 1 --max-peak-gib 100 "
           "--max-call-seconds 20 --max-n st_cached=4096,fastcl_cached=16384",
           tiny="--loss gist --device cpu --sizes 8 --dims 16 --negatives 1 --repeats 1 --threads 1", model=True),
    # Small batches (a training step's): where the dense path or the one pass beats the
    # recomputing kernels, to set the size below which "auto" takes the dense path on GPUs.
    Bench("small", "--sizes 512,1024,2048,4096 --dim 768 --dtype bf16 "
          "--impls fastcl,fastcl-one_pass,fastcl-dense,dense,compiled", tiny="--sizes 8,12 --impls fastcl,fastcl-dense"),
    Bench("dims", f"--sizes 16384 --dim 384,1024 --dtype bf16 --impls {FASTCL},dense,compiled,memeff,inf-cl,cce",
          tiny="--sizes 16 --dim 8,24"),
    Bench("fp32", f"--sizes 4096,16384 --dim 768 --dtype fp32 --fp32-precision high --impls {FASTCL},dense,compiled",
          tiny="--fp32-precision highest"),
    Pytest("cuda-suite", "tests -m 'not gpu' -q --maxfail 50"),
]

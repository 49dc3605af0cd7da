"""``lm-eval``: lm-eval's ``simple_evaluate`` on a jaxflip checkpoint, through the JAX-native
``JaxLM`` or through HFLM on an HF torch model with the torch bridge's bitflip layers.

The shipped tasks (``jaxflip/eval/tasks``: ``moby_dick``) are always available; lm-eval's
built-in tasks are indexed only when a requested task is not found locally (indexing them
takes seconds, and their data comes from the hub).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxflip.eval.model_io import open_model, open_tokenizer, resolve_bitflip

SHIPPED_TASKS = Path(__file__).parent / "tasks"
BACKENDS = ("jax", "torch")


def task_manager(tasks: list[str], include_paths: list[str], metadata: dict | None = None):
    """lm-eval's task index: the shipped tasks and ``include_paths``, lm-eval's own too where a
    task is not among them; ``metadata`` (``--metadata``) goes into every task's config."""
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED_TASKS), *include_paths]
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(task in local.all_tasks for task in tasks):
        return local
    everything = TaskManager(include_path=paths, metadata=metadata)
    unknown = [task for task in tasks if task not in everything.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)} (shipped: {', '.join(local.all_tasks)}; "
                         f"add folders of task YAMLs with --include-path)")
    return everything


def add_arguments(parser) -> None:
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. moby_dick,wikitext")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a folder of lm-eval task YAMLs (repeatable); a task folder is code: a YAML's "
                             "!function imports and runs the Python file it names, so include only folders you trust")
    parser.add_argument("--backend", choices=BACKENDS, default="jax",
                        help="jax: the Flax model; torch: lm-eval's HFLM on an HF torch model (default: %(default)s)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per request")
    parser.add_argument("--batch-size", type=int, default=1, help="requests per forward (default: %(default)s)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task: a count, or a fraction when below 1")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context window for scoring (default: the model's max_position_embeddings)")
    parser.add_argument("--metadata", default=None, metavar="JSON",
                        help="a JSON object of task arguments, as lm-eval's own --metadata (which its advice "
                             "names): e.g. '{\"max_seq_lengths\": [4096]}' for RULER")


def check_arguments(args) -> None:
    args.task_list = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not args.task_list:
        raise ValueError("--tasks names no task")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise ValueError(f"--include-path {path} is not a folder")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not args.limit > 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    args.metadata_dict = None
    if args.metadata is not None:
        try:
            args.metadata_dict = json.loads(args.metadata)
        except json.JSONDecodeError as error:
            raise ValueError(f"--metadata is not JSON ({error})") from None
        if not isinstance(args.metadata_dict, dict):
            raise ValueError(f"--metadata must be a JSON object of task arguments, got {args.metadata}")


def language_model(args, model, tokenizer, bitflip):
    """The lm-eval ``LM`` of the chosen backend, flipping as ``bitflip`` (already applied to the
    Flax model) says. Imported here: lm-eval and torch are optional (the ``eval`` extra), and
    the other commands run without them."""
    if args.backend == "jax":
        from jaxflip.eval.lm_eval_jax import JaxLM

        return JaxLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    from lm_eval.models.huggingface import HFLM

    from jaxflip.eval.torch_model import hf_torch_model
    from jaxflip.torch_bridge import transform_model

    hf_model = hf_torch_model(model)
    if bitflip is not None:
        transform_model(hf_model, bitflip.table)
    return HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length)


def run(args) -> dict:
    import lm_eval
    from lm_eval.utils import make_table

    if args.backend == "torch":  # before JAX loads the checkpoint and starts its GPU backend (torch: optional)
        from jaxflip.torch_bridge import leave_gpu_to_torch

        leave_gpu_to_torch()
    manager = task_manager(args.task_list, args.include_path, args.metadata_dict)
    # the torch backend hands the weights to torch through DLPack, which takes whole arrays only
    model, tokenizer_dir = open_model(args.checkpoint, dtype=args.dtype, shard=args.backend == "jax")
    tokenizer = open_tokenizer(args.tokenizer, tokenizer_dir, args.checkpoint)
    # rules are resolved (and checked) on the Flax model; the torch one has the same layer names
    bitflip = resolve_bitflip(model, args)
    if bitflip is not None:
        bitflip.apply(model)
    lm = language_model(args, model, tokenizer, bitflip)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(model=lm, tasks=args.task_list, num_fewshot=args.num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    payload = {"command": "lm-eval", "checkpoint": args.checkpoint, "backend": args.backend, "tasks": args.task_list,
               "num_fewshot": args.num_fewshot, "limit": limit, "results": results["results"]}
    payload |= {key: results[key] for key in ("groups", "versions", "n-shot") if results.get(key)}
    if bitflip is not None:
        payload["bitflip"] = bitflip.summary()
    return payload

"""The `hf-efficient` command line: info, demo, reference, generate, export, bench, train.

Every failure the user can cause (unknown name, missing path, bad option, an unsupported combination) ends with a
one-line `hf-efficient: error: ...` on stderr and exit status 1 (`--debug` adds the traceback). Anything else is a
bug: its traceback is always printed, then `hf-efficient: internal error: ...`, exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["CACHES", "DEMOS", "STRATEGIES", "UserError", "main"]

# (title, module with a `demo()` function); a family missing from this build is reported and skipped
DEMOS: tuple[tuple[str, str], ...] = (
    ("Reference corpus and models", "hf_efficient.reference"),
    ("Speculative decoding", "hf_efficient.speculative.demo"),
    ("Compressed KV caches and prepacking", "hf_efficient.cache.demo"),
    ("Hierarchical byte models", "hf_efficient.models.byte_demo"),
    ("Dynamic tokenization", "hf_efficient.tokenization.demo"),
    ("ChunkLLM adapters", "hf_efficient.models.chunkllm_demo"),
)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


# `--cache NAME[:N]`: name -> (class in `hf_efficient.cache`, the argument `:N` sets, fixed arguments)
CACHES: dict[str, tuple[str, str | None, dict]] = {
    "gear2": ("GEARCache", None, {"bits": 2}),
    "gear4": ("GEARCache", None, {"bits": 4}),
    "gear8": ("GEARCache", None, {"bits": 8}),
    "kivi2": ("KIVICache", None, {"bits": 2}),
    "kivi4": ("KIVICache", None, {"bits": 4}),
    "kivi8": ("KIVICache", None, {"bits": 8}),
    "streaming": ("StreamingCache", "window", {}),
    "snapkv": ("SnapKVCache", "budget", {}),
    "h2o": ("HeavyHitterCache", "budget", {}),
    "keyformer": ("HeavyHitterCache", "budget", {"score": "keyformer"}),
}
# `--strategy` forms: syntax -> what it builds
STRATEGIES: dict[str, str] = {
    "recycling": "TokenRecycling, draft tree sized by timing this machine",
    "recycling:N": "TokenRecycling, draft tree of N nodes",
    "draft:PATH": "DraftModel with the drafter at PATH, a model folder or a reference model name",
}


class UserError(Exception):
    """An error caused by the command's input; printed as one line."""


@contextlib.contextmanager
def _user_input(what: str) -> Iterator[None]:
    """`ValueError` / `OSError` raised while building `what` from the command's arguments are the user's errors."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise UserError(f"{what}: {error}") from error


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    import hf_efficient
    from hf_efficient import bench, reference
    from hf_efficient.models import register_auto_classes

    packages = ["torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "kernels", "bitsandbytes"]
    print(f"hf_efficient {hf_efficient.__version__}")
    for name in packages:
        try:
            version = importlib.import_module(name).__version__
        except ImportError:
            version = "not installed"
        print(f"  {name:<13} {version}")
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, {torch.get_num_threads()} CPU threads")
    print(f"registered model types: {', '.join(register_auto_classes()) or 'none'}")
    print(f"reference cache: {reference.cache_dir()}")
    for name in reference.REFERENCE_MODELS:
        path = reference.reference_model_path(name)
        print(f"  {name:<13} {'built' if path.is_dir() else 'not built'} ({path})")
    for name, spec in reference.REAL_MODELS.items():
        try:
            path = reference.real_model_path(name, convert=False)
            state = f"converted ({path})"
        except ImportError:
            state = f"package missing: `{spec.install}`"
        except FileNotFoundError:
            state = "not converted yet (the first use converts it)"
        print(f"  {name:<13} {state}: {spec.description}")
    print(f"benchmarks: {', '.join(bench.available())}")
    print(f"recipes: {', '.join(_recipes())}")


def cmd_demo(args: argparse.Namespace) -> None:
    failed = []
    for title, module_name in DEMOS:
        print(f"\n=== {title} ===", flush=True)
        if not _module_present(module_name):
            print(f"(not in this build: {module_name})")
            continue
        start = time.perf_counter()
        try:
            importlib.import_module(module_name).demo()
        except Exception as error:  # one broken family must not hide the others; still exit non-zero
            print(f"FAILED: {type(error).__name__}: {error}")
            failed.append(title)
        print(f"[{title}: {time.perf_counter() - start:.1f} s]", flush=True)
    if failed:
        raise UserError(f"demo sections failed: {', '.join(failed)}")


def cmd_reference(args: argparse.Namespace) -> None:
    from hf_efficient import reference

    names = args.names or None
    for name in names or []:
        if name not in reference.REFERENCE_MODELS:
            raise UserError(f"unknown reference model {name!r}; available: {', '.join(reference.REFERENCE_MODELS)}")
    reference.build_reference_models(names, progress=True)
    for name in names or reference.REFERENCE_MODELS:
        print(f"{name}: {reference.reference_model_path(name)}")


def _load_for_generation(model: str, device: str, trust_remote_code: bool, drafter: bool = False):
    """`(model, tokenizer)` from a local folder or a reference model name; a `drafter` comes without tokenizer, through
    `load_drafter` (which also reads drafters whose LM head `trim_drafter_vocab` cut)."""
    from hf_efficient import reference

    if model in reference.REFERENCE_MODELS or model in reference.REAL_MODELS:
        try:
            lm, tok = reference.reference_model(model)
        except ImportError as error:  # a real model whose carrier package is missing: one line, not a traceback
            raise UserError(str(error)) from error
    else:
        if not Path(model).exists():
            names = ", ".join([*reference.REAL_MODELS, *reference.REFERENCE_MODELS])
            raise UserError(
                f"model {model!r} is neither a local path nor a reference model ({names}); nothing is downloaded"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_efficient.speculative import load_drafter

        with _user_input(f"cannot load {model}"):
            if drafter:
                lm, tok = load_drafter(model), None
            else:
                lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code)
                tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    return lm.to(device).eval(), tok


def _parse_strategy(spec: str) -> tuple[str, str]:
    """`(name, argument)` of a `--strategy` value (`STRATEGIES`), checked before any model is loaded."""
    name, _, arg = spec.partition(":")
    if name not in ("recycling", "draft"):
        valid = ", ".join(f"{syntax} ({text})" for syntax, text in STRATEGIES.items())
        raise UserError(f"unknown strategy {spec!r}; valid: {valid}")
    if name == "recycling" and arg and not arg.isdigit():
        raise UserError(f"--strategy {spec!r}: recycling:N takes a node count N, e.g. recycling:16")
    if name == "draft" and not arg:
        raise UserError("--strategy draft needs a drafter: draft:PATH (a model folder or a reference model name)")
    return name, arg


def build_strategy(spec: str, device: str = "cpu"):
    """The speculative strategy named by `--strategy` (`STRATEGIES`), its drafter on `device`."""
    from hf_efficient.speculative import DraftModel, TokenRecycling

    name, arg = _parse_strategy(spec)
    if name == "recycling":
        with _user_input(f"--strategy {spec}"):
            return TokenRecycling(tree=int(arg) if arg else "auto")
    drafter, _ = _load_for_generation(arg, device, trust_remote_code=False, drafter=True)
    return DraftModel(drafter)


def _parse_cache(spec: str) -> tuple[str, dict]:
    """`(class name in hf_efficient.cache, keyword arguments)` of a `--cache` value (`CACHES`)."""
    name, _, arg = spec.partition(":")
    if name not in CACHES:
        valid = ", ".join(key if argument is None else f"{key}[:N]" for key, (_, argument, _) in CACHES.items())
        raise UserError(f"unknown cache {spec!r}; valid: {valid}")
    class_name, argument, fixed = CACHES[name]
    if arg and (argument is None or not arg.isdigit()):
        raise UserError(f"--cache {spec!r}: {name} takes {'no :N' if argument is None else 'an integer N'}")
    return class_name, {**fixed, **({argument: int(arg)} if arg else {})}


def build_cache(spec: str, config):
    """The `hf_efficient.cache` object named by `--cache` (`CACHES`) for a model of `config`."""
    import hf_efficient.cache

    class_name, kwargs = _parse_cache(spec)
    with _user_input(f"--cache {spec}"):
        return getattr(hf_efficient.cache, class_name)(config=config, **kwargs)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from hf_efficient.compat import cache_kwarg

    if args.strategy:  # bad names fail before any model loads
        _parse_strategy(args.strategy)
    if args.cache:
        _parse_cache(args.cache)
    model, tokenizer = _load_for_generation(args.model, args.device, args.trust_remote_code)
    strategy = build_strategy(args.strategy, args.device) if args.strategy else None
    cache = build_cache(args.cache, model.config) if args.cache else None
    if strategy is not None:
        if cache is not None and not getattr(cache, "is_croppable", False):
            raise UserError(
                f"--cache {args.cache} cannot roll back rejected draft tokens (is_croppable=False); drop --strategy, "
                "or pick a croppable cache (gear*, kivi*, streaming, snapkv)"
            )
        with _user_input(f"--strategy {args.strategy}"):
            strategy.validate(model, model.generation_config)
    if args.chat:
        if tokenizer.chat_template is None:
            raise UserError(f"{args.model} has no chat template; drop --chat to continue the prompt as text")
        chat = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        inputs = inputs.to(args.device)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    extra = {**({"custom_generate": strategy} if strategy else {}), **(cache_kwarg(cache) if cache else {})}
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling, **extra)
    new_tokens = output.shape[-1] - inputs["input_ids"].shape[-1]
    seconds = time.perf_counter() - start
    summary = f"{new_tokens} tokens in {seconds:.2f} s, {new_tokens / seconds:.1f} tokens/s"
    if strategy is not None:
        summary += f", {strategy.stats.mean_accepted:.2f} tokens per target forward ({type(strategy).__name__})"
    if cache is not None and hasattr(cache, "nbytes"):
        summary += f", KV cache {cache.nbytes() / 2**20:.2f} MiB ({type(cache).__name__})"
    print(f"\n[{summary}]", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from hf_efficient.hub import export_custom_generate

    if args.push and not args.repo_id:
        raise UserError("--push needs --repo-id (the Hub repository to upload to)")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UserError(f"--output {output} is not empty; pass --overwrite to write into it")
    _parse_strategy(args.strategy)  # a bad name fails before any model loads
    model, tokenizer = _load_for_generation(args.model, args.device, args.trust_remote_code)
    strategy = build_strategy(args.strategy, args.device)
    if args.warmup:  # ships a warm state, and for TokenRecycling's tree="auto" this machine's forward timings
        inputs = tokenizer(args.warmup, return_tensors="pt").to(args.device)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=32, do_sample=False, custom_generate=strategy)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    folder = export_custom_generate(strategy, output, repo_id=args.repo_id)
    repo = args.repo_id or str(output)
    print(f"wrote {output} (model, tokenizer) and {folder} ({type(strategy).__name__}, self-contained)")
    print(f"use: model.generate(**inputs, custom_generate={repo!r}, trust_remote_code=True)")
    if args.push:
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(args.repo_id, exist_ok=True).repo_id
        commit = api.upload_folder(repo_id=repo_id, folder_path=output, commit_message="hf-efficient export")
        print(f"pushed to {getattr(commit, 'commit_url', commit)}")


def cmd_bench(args: argparse.Namespace) -> None:
    from hf_efficient import bench

    names = bench.available() if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in bench.available():
        raise UserError(f"unknown benchmark {args.name!r}; available: {', '.join(bench.available())} (or 'all')")
    for name in names:
        if args.from_results:
            report = _saved_report(Path(args.out_dir), name, args.device)
            if args.record:
                report.record(args.record)
            print(report.to_markdown())
            continue
        print(f"== bench {name} ({args.device}) ==", flush=True)
        report = bench.run(name, args.device, quick=args.quick, out_dir=args.out_dir, record=args.record)
        print(report.to_markdown())
        print(f"wrote {args.out_dir}/{report.stem}.{{json,md,png}}", flush=True)


def _saved_report(out_dir: Path, name: str, device: str):
    from hf_efficient.bench.harness import BenchReport

    stem = name if device == "cpu" else f"{name}-{device}"
    path = out_dir / f"{stem}.json"
    if not path.is_file():
        raise UserError(f"no saved results {path}; run `hf-efficient bench {name}` first")
    return BenchReport.load(path)


def _recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.stem.startswith("_"))


def cmd_train(args: argparse.Namespace) -> None:
    if args.recipe not in _recipes():
        raise UserError(f"unknown recipe {args.recipe!r}; available: {', '.join(_recipes())}")
    recipe = importlib.import_module(f"hf_efficient.recipes.{args.recipe}")
    recipe.main(args.recipe_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-efficient",
        description="Efficient-modelling components for the Hugging Face stack: byte models, dynamic "
        "tokenization, ChunkLLM adapters, speculative drafters, compressed KV caches.",
    )
    debug_help = "print the traceback of errors caused by the input too (a bug's traceback is always printed)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # `--debug` after the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_parser_with(common))

    sub.add_parser("info", help="versions, device, registered model types, reference models").set_defaults(
        func=cmd_info
    )
    sub.add_parser(
        "demo", help="show every capability on the real models (self-trained parts once built)"
    ).set_defaults(func=cmd_demo)

    ref = sub.add_parser("reference", help="build the embedded reference models that are missing")
    ref.add_argument("names", nargs="*", help="reference model names (default: all)")
    ref.set_defaults(func=cmd_reference)

    gen = sub.add_parser("generate", help="stream a generation from a model path or a reference model name")
    gen.add_argument("model", help="local model folder, or a reference model name ('smollm2-135m', 'target', ...)")
    gen.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a chat message (the chat template)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    gen.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own code")
    gen.add_argument(
        "--strategy",
        metavar="SPEC",
        help="lossless speculative decoding: recycling, recycling:N (tree nodes), or draft:PATH (a drafter folder or "
        "reference model name)",
    )
    gen.add_argument(
        "--cache",
        metavar="SPEC",
        help=f"compressed KV cache: {', '.join(k if a is None else k + '[:N]' for k, (_, a, _) in CACHES.items())} "
        "(N: the window of streaming, the token budget of the others)",
    )
    gen.set_defaults(func=cmd_generate)

    export = sub.add_parser(
        "export", help="write MODEL with a self-contained custom_generate/ speculative strategy (a Hub-ready folder)"
    )
    export.add_argument("model", help="local model folder, or a reference model name")
    export.add_argument("--strategy", required=True, metavar="SPEC", help="recycling, recycling:N, or draft:PATH")
    export.add_argument(
        "--output", required=True, metavar="DIR", help="the folder to write (model + custom_generate/)"
    )
    export.add_argument(
        "--warmup",
        metavar="TEXT",
        help="generate 32 tokens from TEXT first: ships a warm state (and TokenRecycling's timings for this machine)",
    )
    export.add_argument("--repo-id", help="the Hub repository the folder is for (README example; --push target)")
    export.add_argument("--push", action="store_true", help="upload DIR to --repo-id (needs network and a token)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    export.add_argument("--device", default="cpu", help="torch device for the warm-up (default: cpu)")
    export.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own code")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="run a benchmark against the Hugging Face baseline")
    bench.add_argument("name", help="benchmark name, or 'all' (see `hf-efficient info`)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    bench.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    bench.add_argument("--out-dir", default="bench-results", help="output folder (default: bench-results)")
    bench.add_argument("--record", metavar="BENCHMARKS_MD", help="replace this benchmark's section in the file")
    bench.add_argument(
        "--from-results", action="store_true", help="do not run: reuse the saved OUT_DIR/NAME.json (with --record)"
    )
    bench.set_defaults(func=cmd_bench)

    train = sub.add_parser("train", help="run a training recipe from recipes/ (arguments after `--`)")
    train.add_argument("recipe", help="recipe name, e.g. train_reference")
    train.add_argument("recipe_args", nargs=argparse.REMAINDER, help="arguments passed to the recipe")
    train.set_defaults(func=cmd_train)
    return parser


def _parser_with(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """The subcommand parser class: every subcommand also takes `common`'s options."""

    class SubcommandParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, parents=[common], **kwargs)

    return SubcommandParser


def _user_caused(error: BaseException) -> bool:
    """Whether the command's input or the environment caused `error`: a `UserError`, or a missing package, model or
    file (`ImportError`, `FileNotFoundError`; not a module of ours that fails to import, which is a bug)."""
    if isinstance(error, ModuleNotFoundError):
        return (error.name or "").partition(".")[0] != __name__.partition(".")[0]
    return isinstance(error, (UserError, ImportError, FileNotFoundError))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "recipe_args", None) and args.recipe_args[0] == "--":
        args.recipe_args = args.recipe_args[1:]
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("hf-efficient: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not _user_caused(error):  # a bug: never folded into one line
            traceback.print_exc()
            print(f"hf-efficient: internal error: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        print(f"hf-efficient: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

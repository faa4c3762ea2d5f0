"""The `hf-efficient` command line: info, demo, reference, generate, bench, train.

Every failure the user can cause (unknown name, missing path, bad option) ends with a one-line
`hf-efficient: error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEMOS", "main"]

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


class UserError(Exception):
    """An error caused by the command's input; printed as one line."""


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


def _load_for_generation(model: str, device: str, trust_remote_code: bool):
    from hf_efficient import reference

    if model in reference.REFERENCE_MODELS or model in reference.REAL_MODELS:
        try:
            lm, tokenizer = reference.reference_model(model)
        except ImportError as error:  # a real model whose carrier package is missing: one line, not a traceback
            raise UserError(str(error)) from error
    else:
        if not Path(model).exists():
            names = ", ".join([*reference.REAL_MODELS, *reference.REFERENCE_MODELS])
            raise UserError(
                f"model {model!r} is neither a local path nor a reference model ({names}); nothing is downloaded"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    return lm.to(device).eval(), tokenizer


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    model, tokenizer = _load_for_generation(args.model, args.device, args.trust_remote_code)
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
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    new_tokens = output.shape[-1] - inputs["input_ids"].shape[-1]
    seconds = time.perf_counter() - start
    print(f"\n[{new_tokens} tokens in {seconds:.2f} s, {new_tokens / seconds:.1f} tokens/s]", file=sys.stderr)


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    gen.set_defaults(func=cmd_generate)

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "recipe_args", None) and args.recipe_args[0] == "--":
        args.recipe_args = args.recipe_args[1:]
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError, ImportError) as error:
        print(f"hf-efficient: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hf-efficient: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `purireid` command: extract, search, export, doctor, recipes, config (argparse; the work is in
purireid.serving.api, purireid.serving.search, purireid.serving.export, purireid.serving.doctor and
purireid.config.check).

Exit status: 0 success, 1 failure (bad input named with its fix, an unwritable --out, a failed
parity check, doctor findings), 2 usage errors (argparse's convention: a missing or unknown
option, a bad option value). Every error is one line, "purireid COMMAND: error: ...", naming the
option or file and the fix; no traceback. The output location (--out) is checked before
anything is read or computed.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

EPILOG = "Every subcommand has its own --help. README.md, section 'Using a trained model', shows them in use."
# Options people reach for that have another name here.
_OPTION_ALIASES = {"--k": "--topk", "-k": "--topk", "--top-k": "--topk", "--output": "--out", "-o": "--out"}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default appended to its help only where it says
    something: not for required options, flags, options without a default (None), nor where
    the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (exit status 2) pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _say(message: str) -> None:
    print(message, flush=True)


def writable_output(path: str | Path, *, option: str = "--out", folder: bool = False) -> Path:
    """Check, before any work, that the file (or, with `folder`, the folder) `path` can be written:
    it is not an existing folder (file) itself, the nearest existing folder above it is a folder,
    and a file can be created there (permissions, read-only file systems, /proc, ...). Missing
    folders are left to the writer, which creates them. InputError naming `option` otherwise."""
    from purireid.serving.api import InputError

    path = Path(path)
    if not folder and path.is_dir():
        raise InputError(f"{option} {path} is an existing folder; give the path of a file to write in it, "
                         f"e.g. {option} {path / 'NAME'}")
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is an existing file; give a folder (created if missing)")
    above = path if folder else path.parent
    above = above if str(above) else Path(".")
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise InputError(f"{option} {path}: {above} is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".purireid-write-test.", dir=above)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "a read-only file system",
                  errno.ENOENT: "its file system takes no new files"}.get(exc.errno, exc.strerror or str(exc))
        raise InputError(f"{option} {path}: cannot create files in {above} ({reason}); choose a folder you can "
                         "write to") from None
    return path


def _replacing(command: str, path: str | Path) -> None:
    """Say, before the work, that an existing --out file will be replaced (atomically, once the new
    one is complete: until then, and if the command fails, the old file stays)."""
    if Path(path).is_file():
        _say(f"{command}: {path} exists; it is replaced once the new file is complete")


# --------------------------------------------------------------------------- extract


def cmd_extract(args: argparse.Namespace) -> int:
    from purireid.serving.api import FeatureExtractor, InputError, collect_images, write_feature_file

    writable_output(args.out)
    _replacing("extract", args.out)
    images = collect_images(args.images, root=args.root, split=args.split)
    fx = FeatureExtractor(args.checkpoint, device=args.device, views=args.views, batch_size=args.batch_size,
                          workers=args.workers, cpu_fast_path=False if args.no_fold else None)
    height, width = fx.input_size
    _say(f"extract: {len(images)} images, {fx.checkpoint.arch} at {height}x{width} on {fx.device}, "
         f"views {', '.join(fx.views)}")
    start = time.perf_counter()
    result = fx.extract(images, skip_unreadable=args.skip_unreadable,
                        on_skip=lambda path, why: logging.getLogger("purireid.extract").warning(
                            "skipped unreadable image %s (%s)", path, why))
    seconds = time.perf_counter() - start
    if not result.paths:
        raise InputError(f"none of the {len(images)} images could be read (all skipped as unreadable); "
                         f"{args.out} was not written")
    write_feature_file(args.out, result, fx.checkpoint)
    skipped = f", {len(result.skipped)} unreadable skipped (listed in the file's /skipped)" if result.skipped else ""
    _say(f"extract: wrote {len(result.paths)} x {fx.feat_dim}-d features to {args.out} "
         f"({len(result.paths) / max(seconds, 1e-9):.1f} images/s){skipped}")
    return 0


# --------------------------------------------------------------------------- search


def _query_features(args: argparse.Namespace, gallery) -> tuple:  # -> (features, paths, source)
    from purireid.io.filekinds import file_kind
    from purireid.serving.api import FeatureExtractor, InputError, check_same_model, collect_images, read_feature_file

    sources = args.query
    if len(sources) == 1 and (Path(sources[0]).suffix.lower() in (".h5", ".hdf5") or file_kind(sources[0]) == "hdf5"):
        query = read_feature_file(sources[0])
        check_same_model(query, gallery)
        return query.features["global"] if "global" in query.features else None, query.paths, str(query.path)
    checkpoint = args.checkpoint or gallery.checkpoint_path
    if not checkpoint or not Path(checkpoint).is_file():
        raise InputError(f"query images need the model that made {gallery.path}: its checkpoint "
                         f"{gallery.checkpoint_path or '(not recorded)'} is not there; give it with --checkpoint FILE")
    images = collect_images(sources)
    fx = FeatureExtractor(checkpoint, device=args.device, views="global")
    check_same_model(fx.checkpoint, gallery)
    result = fx.extract(images, skip_unreadable=args.skip_unreadable,
                        on_skip=lambda path, why: logging.getLogger("purireid.serving.search").warning(
                            "skipped unreadable query image %s (%s)", path, why))
    return result.features["global"], result.paths, "images"


def cmd_search(args: argparse.Namespace) -> int:
    import numpy as np

    from purireid.serving.api import InputError, read_feature_file, resolve_device
    from purireid.serving.search import (DISTANCES, exact_search, market_identities, protocol_metrics, ranked_lists,
                                         rerank_search, write_ranked_html, write_ranked_json)

    out = writable_output(args.out, folder=True)
    gallery = read_feature_file(args.gallery)
    if "global" not in gallery.features:
        raise InputError(f"{gallery.path} holds no global-view features (views: {', '.join(gallery.features)}); "
                         "extract it again with --views global or all")
    query, query_paths, source = _query_features(args, gallery)
    if query is None or len(query) == 0:
        raise InputError(f"no query features in {source}")
    g, g_paths = gallery.features["global"], gallery.paths
    q_ids, g_ids = market_identities(query_paths), market_identities(g_paths)
    junk_dropped = 0
    if q_ids is not None and g_ids is not None and (g_ids[0] == -1).any():
        # The evaluation protocol: junk (pid -1) never enters the gallery. Dropped before the
        # search, as the evaluate stage's dataset loader does, so that re-ranking, whose
        # neighbourhoods span the gallery, sees the same gallery too.
        keep = g_ids[0] != -1
        junk_dropped = int((~keep).sum())
        g, g_paths = g[keep], [p for p, k in zip(g_paths, keep) if k]
        g_ids = (g_ids[0][keep], g_ids[1][keep])
    if not g_paths:
        raise InputError(f"{gallery.path} leaves no gallery images to search (all {junk_dropped} are junk, pid -1)")
    device = resolve_device(args.device)
    topk = min(args.topk, len(g_paths))  # what each list holds
    start = time.perf_counter()
    reranked = None
    if args.rerank:
        result, reranked = rerank_search(query, g, topk)
    else:
        result = exact_search(query, g, topk, backend=args.backend, device=device)
    seconds = time.perf_counter() - start
    ranked = ranked_lists(result, query_paths, g_paths, q_ids, g_ids)
    meta = {"gallery": str(gallery.path), "query": source, "checkpoint_sha256": gallery.checkpoint_sha256,
            "input_size": list(gallery.input_size), "topk": topk,
            **({"topk_requested": args.topk} if args.topk != topk else {}), "rerank": bool(args.rerank),
            "distance": DISTANCES[bool(args.rerank)], "junk_dropped": junk_dropped}
    metrics_line = ""
    if q_ids is not None and g_ids is not None:
        try:
            metrics = protocol_metrics(query, g, q_ids, g_ids, max_rank=args.max_rank, reranked=reranked)
        except ValueError as exc:  # e.g. no query has a true match
            _say(f"search: identities known from the file names, but no metrics: {exc}")
        else:
            cmc = np.asarray(metrics["cmc"])
            ranks = [r for r in (1, 5, 10, 20) if r <= len(cmc)]
            meta["metrics"] = {"mAP": float(metrics["mAP"]),
                               **{f"rank{r}": float(cmc[r - 1]) for r in ranks},
                               "num_valid_queries": int(metrics["num_valid_queries"]),
                               "scale": "fractions (1.0 = 100 %)",
                               "protocol": "Market-1501 (docs/method.md, Evaluation protocol): same identity "
                                           "and camera ignored, junk left out"}
            if "mINP" in metrics:
                meta["metrics"]["mINP"] = float(metrics["mINP"])
            metrics_line = ("mAP {:.2%}".format(metrics["mAP"])
                            + "".join(f"  Rank-{r} {cmc[r - 1]:.2%}" for r in ranks)
                            + (f"  mINP {metrics['mINP']:.2%}" if "mINP" in metrics else "")
                            + f"  ({metrics['num_valid_queries']} queries with a true match)")
    write_ranked_json(out / "ranked.json", ranked, meta)
    summary = f"{len(query_paths)} queries over {len(g_paths)} gallery images; " + (metrics_line or
              "identities unknown (file names not Market-style), no metrics")
    write_ranked_html(out / "index.html", ranked, title=f"purireid search: {gallery.path.name}", summary=summary,
                      distance=DISTANCES[bool(args.rerank)])
    if junk_dropped:
        _say(f"search: {junk_dropped} junk gallery images (pid -1) left out, as the evaluation protocol does")
    capped = f" (--topk {args.topk}: the gallery holds {len(g_paths)})" if args.topk != topk else ""
    _say(f"search: {len(query_paths)} queries x {len(g_paths)} gallery, top {topk}{capped} in {seconds:.3f} s"
         + (" (re-ranked)" if args.rerank else ""))
    if metrics_line:
        _say(f"search: {metrics_line}")
    _say(f"search: wrote {out / 'ranked.json'} and {out / 'index.html'}")
    return 0


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from purireid.serving.export import export_model

    writable_output(args.out)
    _replacing("export", args.out)
    report = export_model(args.checkpoint, args.out, fmt=args.format, views=args.views, opset=args.opset,
                          tolerance=args.tolerance)
    height, width = report.input_size
    opset = f", opset {report.opset}" if report.opset else ""
    _say(f"export: {report.format}{opset}, input float32 [batch, 3, {height}, {width}] (dynamic batch), "
         f"outputs {', '.join(report.views)}")
    _say(f"export: parity with PyTorch: max abs diff {report.max_abs_diff:.3g} (tolerance {report.tolerance:g})")
    _say(f"export: wrote {report.path}")
    return 0


# --------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from purireid.serving.doctor import doctor_checks, format_check, load_doctor_config

    config, source = load_doctor_config(args.config)
    _say(f"purireid doctor — config: {source}")
    failures, section = [], None
    for check in doctor_checks(config, run=not args.skip_run):
        if check.section != section:
            section = check.section
            _say(f"\n{section}")
        _say(format_check(check))
        if check.status == "fail":
            failures.append(check)
    if failures:
        _say(f"\ndoctor: {len(failures)} problem(s) for this config on this machine: "
             + "; ".join(f.name for f in failures))
        return 1
    _say("\ndoctor: this machine can run this config")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from purireid.config.recipes import describe_registry

    print(describe_registry(), end="")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from purireid.config.check import check_layers, parse_command_line, read_layer
    from purireid.config.dag import stage_config
    from purireid.config.resolve import ConfigError, load_schema
    from purireid.serving.doctor import default_config_path

    default = None if args.no_default else default_config_path()
    problems, layers = [], []
    for path, name in [*([(default, "config.yaml")] if default else []), *((f, f) for f in args.files)]:
        try:
            layers.append(read_layer(path, name))
        except ConfigError as exc:
            problems.append(str(exc))
    try:
        layers += [parse_command_line(args.config)] if args.config else []
    except ConfigError as exc:
        problems.append(str(exc))
    resolved, found = check_layers(layers) if not problems else (None, [])
    for problem in problems + found:
        print(f"purireid config: error: {problem}", file=sys.stderr)
    if resolved is None:
        return 1
    merged = " + ".join(layer.name for layer in layers) or "the schema's defaults"
    order = list(load_schema()["properties"])  # the schema's order, which the docs follow
    values = stage_config(resolved, args.stage) if args.stage else resolved
    values = dict(sorted(values.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    what = f"the config job {args.stage} is given" if args.stage else "the resolved config"
    print(f"# {what}: {merged}, checked\n" + yaml.safe_dump(values, sort_keys=False), end="")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from purireid import __version__

    parser = _Parser(prog="purireid", description="Use a trained purireid model: features of your own "
                     "images, gallery search, export; a check of this machine and of config files.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"purireid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_extract, _add_search, _add_export, _add_doctor_recipes, _add_config):
        add(sub)
    return parser


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", formatter_class=_Formatter, help="features of images into an HDF5 file",
                       description="L2-normalised features of images, written atomically into an HDF5 file with "
                       "the image paths, the checkpoint's sha256 and the input size.\n\n"
                       "  purireid extract results/market1501/student/model.pth photos/ --out gallery.h5")
    p.add_argument("checkpoint", help="model.pth written by the train_teacher / train_student rule")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or manifests "
                   "(one path a line, or a CSV with a 'path' column such as purireid's manifest.csv)")
    p.add_argument("--out", required=True, help="the HDF5 file to write (missing folders are created)")
    p.add_argument("--root", help="folder that relative paths in a manifest start from (default: the manifest's folder)")
    p.add_argument("--split", help="with a CSV manifest that has a 'split' column: only this split (e.g. query)")
    p.add_argument("--views", default="global", choices=["global", "all"], help="the global view (used for "
                   "retrieval) or all three views")
    p.add_argument("--device", default="auto", help="auto (CUDA when there), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_at_least(1), default=None, help="images per batch (default: the "
                   "checkpoint's data.test_batch_size, else 64)")
    p.add_argument("--workers", type=_at_least(1), default=2, help="image-decoding threads")
    p.add_argument("--skip-unreadable", action="store_true", help="leave unreadable images out with a warning "
                   "(default: stop, naming the image)")
    p.add_argument("--no-fold", action="store_true", help="on the CPU, run ResNet-50 as the evaluate stage does "
                   "(by default its BatchNorm is folded into the convolutions and it runs channels_last: "
                   "faster, features equal up to float rounding)")
    p.set_defaults(func=cmd_extract)


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", formatter_class=_Formatter, help="rank a gallery for query images",
                       description="Exact k nearest gallery images of each query (squared Euclidean distance of "
                       "the global features), optionally k-reciprocal re-ranked. Writes DIR/ranked.json and "
                       "DIR/index.html; with Market-style file names (0002_c1s1_000451_03.jpg) it also prints "
                       "mAP and Rank-k under the evaluate stage's protocol.\n\n"
                       "  purireid search --gallery gallery.h5 --query query.h5 --out ranked/")
    p.add_argument("--gallery", required=True, help="feature file of `purireid extract` (or the workflow's "
                   "teacher features)")
    p.add_argument("--query", required=True, nargs="+", help="a feature file of `purireid extract` from the "
                   "same checkpoint, or query images / folders / manifests (then extracted with --checkpoint)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--topk", type=_at_least(1), default=10, help="gallery images listed per query; at most "
                   "the whole gallery")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3); "
                   "builds the whole query x gallery matrix")
    p.add_argument("--checkpoint", help="for query images: the checkpoint (default: the one recorded in the gallery file)")
    p.add_argument("--backend", default="auto", choices=["auto", "bf16", "faiss", "torch"],
                   help="candidate scan of the exact search (results are identical): auto (the float32 GEMM on "
                   "a GPU, the fastest in a short timing on a CPU), bf16 (CPU), faiss flat L2 (CPU, or GPU "
                   "with faiss-gpu), float32 torch (CPU or CUDA)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there), cpu, cuda or cuda:N")
    p.add_argument("--max-rank", type=_at_least(1), default=50, help="CMC length for the metrics")
    p.add_argument("--skip-unreadable", action="store_true", help="for query images: leave unreadable ones out")
    p.set_defaults(func=cmd_search)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from purireid.serving.export import DEFAULT_TOLERANCE, ONNX_OPSET

    p = sub.add_parser("export", formatter_class=_Formatter, help="export to ONNX or TorchScript",
                       description="Export the model's inference path: input float32 [batch, 3, H, W] RGB, "
                       "ImageNet-normalised, H x W the checkpoint's input size, dynamic batch; output the "
                       "L2-normalised global feature (or all three views). The file is written only if the "
                       "exported model matches PyTorch on a test batch within --tolerance.\n\n"
                       "  purireid export results/market1501/student/model.pth --format onnx --out student.onnx")
    p.add_argument("checkpoint", help="model.pth written by the train_teacher / train_student rule")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="onnx (opset --opset, run "
                   "with onnxruntime) or torchscript (torch.jit.load, no purireid needed)")
    p.add_argument("--out", required=True, help="the file to write (missing folders are created)")
    p.add_argument("--views", default="global", choices=["global", "all"], help="outputs of the exported "
                   "model: the global feature (used for retrieval), or all three views")
    p.add_argument("--opset", type=_at_least(ONNX_OPSET), default=ONNX_OPSET, help="ONNX opset")
    p.add_argument("--tolerance", type=_positive_float, default=DEFAULT_TOLERANCE,
                   help="largest allowed absolute difference of the normalised features")
    p.set_defaults(func=cmd_export)


def _add_doctor_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", formatter_class=_Formatter, help="check this machine against a config",
                       description="What this machine offers the pipeline (torch, CUDA, GPUs, bf16, faiss, "
                       "NCCL/gloo), what the config needs (device, ImageNet weights, dataset), and a few "
                       "seconds of the real thing on every device. Exit status 1 when something the config "
                       "needs is missing.\n\n  purireid doctor --config config/presets/market1501.yaml")
    p.add_argument("--config", help="config file merged over the embedded default config.yaml (as "
                   "snakemake --configfile); relative paths in it are taken from the current folder")
    p.add_argument("--skip-run", action="store_true", help="only the checks, no train step nor kNN on the devices")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("recipes", formatter_class=_Formatter, help="list the config's recipes and their settings",
                       description="The named recipes and parts the config key 'recipe' chooses "
                       "(purireid/config/recipes.py), with the keys each part sets; [ablation] marks the parts "
                       "the ablation rows without_<part> / with_<part> remove or add.\n\n  purireid recipes")
    p.set_defaults(func=cmd_recipes)


def _add_config(sub: argparse._SubParsersAction) -> None:
    from purireid.config.dag import STAGES

    p = sub.add_parser("config", formatter_class=_Formatter, help="check config files before a run",
                       description="Check config files as the workflow merges them: the embedded default "
                       "config.yaml first (as snakemake does), then each FILE in order (as --configfile FILE...), "
                       "then --config KEY=VALUE (as snakemake --config). One line per problem, naming the file "
                       "(and line) or the command line: YAML syntax, unknown keys with the nearest valid one, "
                       "types, ranges, keys that must agree, retired keys; exit status 1. A good config prints "
                       "its resolved values, or with --stage what that stage's job is given.\n\n"
                       "  purireid config config/presets/market1501.yaml --stage train_teacher")
    p.add_argument("files", nargs="*", metavar="FILE", help="config files, merged in order over config.yaml")
    p.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="top-level keys as snakemake "
                   "--config reads them, merged last")
    p.add_argument("--stage", choices=list(STAGES), metavar="NAME", help="print only the config this stage's job "
                   f"is given: {', '.join(STAGES)}")
    p.add_argument("--no-default", action="store_true", help="leave the embedded config.yaml out (as snakemake "
                   "--replace-workflow-config): the files over the schema's defaults, which are the paper's")
    p.set_defaults(func=cmd_config)


def _unrecognised(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> None:
    """Refuse unknown arguments as the subcommand's usage error, suggesting the option meant."""
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    target = commands.get(command, parser)
    known = [o for a in target._actions for o in a.option_strings]
    hints = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        meant = _OPTION_ALIASES.get(name)
        if meant not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            meant = close[0] if close else None
        if meant:
            hints.append(f"{name}: did you mean {meant}?")
    target.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: Sequence[str] | None = None) -> int:
    from purireid.config.resolve import ConfigError
    from purireid.io.checkpoints import CheckpointError
    from purireid.io.features import FeatureFileMismatch
    from purireid.log import setup_logging
    from purireid.serving.api import InputError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not argv:  # `purireid` alone: the command list
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    args, extras = parser.parse_known_args(argv)
    if extras:
        _unrecognised(parser, args.command, extras)
    setup_logging(None)
    try:
        return int(args.func(args) or 0)
    except (InputError, ConfigError, CheckpointError, FeatureFileMismatch) as exc:
        print(f"purireid {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a write that failed after the checks (a full disk, a vanished folder, ...)
        print(f"purireid {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - known failure kinds without a traceback
        from purireid.serving.export import ParityError

        if isinstance(exc, ParityError):
            print(f"purireid {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

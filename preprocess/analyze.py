"""Index the BreakHis images, validate them, and summarise the dataset."""
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from config import MAGNIFICATIONS, Config
from utils.helpers import PipelineError, index_path, log, plots_dir, require, tables_dir, warn, write_csv

SUBTYPES = {
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"),
    "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"),
    "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"),
    "PC": ("malignant", "papillary_carcinoma"),
}
CLASS_CODE = {"B": "benign", "M": "malignant"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NAME_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<code>A|F|PT|TA|DC|LC|MC|PC)-(?P<slide>\d+-\d+[A-Z]*)-(?P<mag>40|100|200|400)-(?P<seq>\d+)"
    r"\.(?:png|jpe?g|tiff?|bmp)$", re.IGNORECASE)
STEM_RE = re.compile(r"^\d+-\d+")
MARKER = "SYNTHETIC.txt"
BREAKHIS_IMAGES = 7909
COLUMNS = ["path", "file", "label", "class_name", "subtype_code", "subtype", "subtype_group", "slide_id",
           "patient_id", "magnification", "seq", "width", "height"]
DOWNLOAD_HINT = ("Get the data with `bash setup.sh` (downloads and extracts BreaKHis_v1.tar.gz from "
                 "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz into data/), or point --data-root at an "
                 "extracted copy, or try the pipeline on generated images with `python main.py --demo`.")


def stem_of(slide_id):
    """Patient key: the numeric stem of a slide id (14-22549AB -> 14-22549)."""
    return STEM_RE.match(slide_id).group(0)


def parse_name(name):
    """Every label a BreakHis file name carries, or None when it is not one."""
    m = NAME_RE.match(name)
    if not m:
        return None
    code = m["code"].upper()
    class_name, subtype = SUBTYPES[code]
    if CLASS_CODE[m["cls"].upper()] != class_name:
        return None
    slide = m["slide"].upper()
    return dict(file=name, label=int(class_name == "malignant"), class_name=class_name, subtype_code=code,
                subtype=subtype, slide_id=slide, patient_id=stem_of(slide), magnification=f"{m['mag']}X",
                seq=int(m["seq"]))


def no_data(root, why):
    return PipelineError(
        f"no BreakHis images found: {why} (data root: {Path(root).resolve()}). Expected either the original layout "
        f"<root>/BreaKHis_v1/histology_slides/breast/{{benign,malignant}}/SOB/<subtype>/<slide>/<mag>X/*.png "
        f"(the Kaggle copy nests one more BreaKHis_v1/ folder; both are found anywhere under the root) or a flat "
        f"folder of files named like SOB_M_DC-14-2980-400-012.png. {DOWNLOAD_HINT}")


def walk(root, prune_breast):
    """Yield (dirpath, filenames), skipping hidden folders and synthetic trees nested below root."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if here != root and MARKER in filenames:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
        if prune_breast and here.name == "breast" and here.parent.name == "histology_slides":
            dirnames[:] = []
        yield here, filenames


def find_base(root):
    """The histology_slides/breast folder under root (shallowest copy), or root itself for a flat folder."""
    found = [d for d, _ in walk(root, True) if d.name == "breast" and d.parent.name == "histology_slides"]
    if not found:
        return root
    depth = min(len(d.parts) for d in found)
    best = [d for d in found if len(d.parts) == depth]
    if len(best) > 1:
        raise PipelineError(f"several BreakHis copies under {root.resolve()}: {', '.join(map(str, best))}. "
                            f"Point --data-root at one of them.")
    return best[0]


def list_files(base):
    return [d / f for d, files in walk(base, False) for f in sorted(files)]


def is_synthetic(base):
    return any((p / MARKER).exists() for p in [base, *base.parents])


def inspect_image(path):
    """(why the image is unreadable or '', its width, its height); truncated PNGs fail the chunk CRC walk."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file", 0, 0
        with Image.open(path) as im:
            width, height = im.size
            if im.format == "PNG":
                im.verify()
            else:
                im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        return f"{type(e).__name__}: {e}".strip(), 0, 0
    return "", width, height


def inspect(paths, workers=8):
    """(reason, width, height) per path, checked in a thread pool."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(inspect_image, paths, chunksize=64))


def validate(paths, workers=8):
    """Reason per path ('' when fine)."""
    return [why for why, _, _ in inspect(paths, workers)]


def group_subtypes(index, min_images):
    counts = index["subtype"].value_counts()
    keep = set(counts[counts >= min_images].index)
    return index["subtype"].where(index["subtype"].isin(keep), "Other")


def suggested_min_images(n_images):
    """--subtype-min-images for a dataset of `n_images`: the default's share of BreakHis, scaled."""
    return max(2, round(Config.subtype_min_images * n_images / BREAKHIS_IMAGES))


def subtype_warning(index, min_images):
    """Why --subtype-min-images makes the subtype head degenerate on this data, with a value to try; '' if not."""
    n_classes, present = index["subtype_group"].nunique(), index["subtype"].nunique()
    folded = index.loc[index["subtype_group"] == "Other", "subtype"].nunique()
    value = suggested_min_images(len(index))
    collapsed = len(index) < BREAKHIS_IMAGES / 4 and folded > present / 2 and value < min_images
    if n_classes >= 2 and not collapsed:
        return ""
    if n_classes < 2:
        why = (f"the subtype head has one class ({index['subtype_group'].iloc[0]}): subtypes with fewer than "
               f"--subtype-min-images {min_images} images become Other, so subtype metrics are n/a")
    else:
        why = (f"--subtype-min-images {min_images} folds {folded} of {present} subtypes into Other on "
               f"{len(index)} images (BreakHis has {BREAKHIS_IMAGES})")
    if value >= min_images:
        return f"{why}. Lower --subtype-min-images and rerun from the analyze stage."
    return (f"{why}. Try --subtype-min-images {value} ({Config.subtype_min_images} scaled from BreakHis's "
            f"{BREAKHIS_IMAGES} images to these {len(index)}) and rerun from the analyze stage.")


def check_patients(index):
    mixed = index.groupby("patient_id")["label"].nunique()
    mixed = sorted(mixed[mixed > 1].index)
    if mixed:
        raise PipelineError(f"patient stem(s) {', '.join(mixed)} have both benign and malignant images; the file "
                            f"names are inconsistent. Fix or remove those files and rerun analyze.")


def build_index(data_root, min_images=500):
    """(index, excluded): one row per usable image with every label, and the unreadable files with the reason."""
    root = Path(data_root)
    if not root.is_dir():
        raise no_data(root, "the folder does not exist" if not root.exists() else "it is not a folder")
    base = find_base(root)
    rows, seen = [], set()
    for path in list_files(base):
        info = parse_name(path.name) if path.suffix.lower() in IMAGE_EXTS else None
        if info is None or info["file"].upper() in seen:
            continue
        seen.add(info["file"].upper())
        rows.append(dict(info, path=os.path.abspath(path)))
    if not rows:
        raise no_data(root, "no file named like SOB_<B|M>_<subtype>-<slide>-<mag>-<seq>.png")
    found = inspect([r["path"] for r in rows])
    reasons = [why for why, _, _ in found]
    excluded = pd.DataFrame([(r["path"], why) for r, why in zip(rows, reasons) if why], columns=["path", "reason"])
    for path, why in excluded.itertuples(index=False):
        warn(f"excluding unreadable image {path} ({why})")
    rows = [dict(r, width=w, height=h) for r, (why, w, h) in zip(rows, found) if not why]
    if not rows:
        raise no_data(root, f"all {len(reasons)} image files are unreadable")
    index = pd.DataFrame(rows)
    index["subtype_group"] = group_subtypes(index, min_images)
    index["mag_order"] = index["magnification"].map({m: i for i, m in enumerate(MAGNIFICATIONS)})
    index = index.sort_values(["patient_id", "subtype", "slide_id", "mag_order", "seq"]).reset_index(drop=True)
    check_patients(index)
    return index[COLUMNS], excluded


def load_index(cfg):
    """output/index.csv as written by the analyze stage."""
    path = require(index_path(cfg), "analyze")
    index = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "subtype_code": str}, keep_default_na=False)
    if not {"width", "height"} <= set(index):
        raise PipelineError(f"{path} has no image sizes (an earlier version wrote it). Rerun the analyze stage: "
                            f"python main.py --stages analyze")
    return index


def subtype_classes(index):
    """Grouped subtype names for the subtype head: by image count, descending, 'Other' last."""
    counts = index["subtype_group"].value_counts()
    names = sorted(counts.index, key=lambda n: (n == "Other", -counts[n], n))
    return list(names)


def summary_table(index):
    rows = [
        ("total_patients_by_stem", index["patient_id"].nunique()),
        ("slide_folders", index[["subtype_code", "slide_id"]].drop_duplicates().shape[0]),
        ("benign_patients", index.loc[index.label == 0, "patient_id"].nunique()),
        ("malignant_patients", index.loc[index.label == 1, "patient_id"].nunique()),
        ("total_images", len(index)),
    ]
    rows += [(f"images_{c}", n) for c, n in as_dict(index["class_name"].value_counts()).items()]
    rows += [(f"images_{m}", n) for m, n in as_dict(mag_counts(index)).items()]
    return pd.DataFrame(rows, columns=["metric", "value"])


def mag_counts(index):
    return index["magnification"].value_counts().reindex(MAGNIFICATIONS).dropna().astype(int)


def as_dict(counts):
    return {k: int(v) for k, v in counts.items()}


def mag_class_table(index):
    table = pd.crosstab(index["magnification"], index["class_name"])
    table = table.reindex([m for m in MAGNIFICATIONS if m in table.index])
    return table[[c for c in ("malignant", "benign") if c in table.columns]]


def subtype_table(index):
    table = index.groupby("subtype").agg(
        Class=("class_name", "first"), Slides=("slide_id", "nunique"), Patients=("patient_id", "nunique"),
        Images=("path", "size")).reset_index()
    table = table.rename(columns={"subtype": "Tumor Subtype", "Patients": "Patients (by stem)",
                                  "Images": "Total Images"})
    return table.sort_values("Total Images", ascending=False).reset_index(drop=True)


def group_table(index):
    table = index.groupby("subtype_group").agg(
        images=("path", "size"), patients=("patient_id", "nunique"),
        subtypes=("subtype", lambda s: "|".join(sorted(set(s))))).reset_index()
    order = {name: i for i, name in enumerate(subtype_classes(index))}
    table["class_index"] = table["subtype_group"].map(order)
    return table.sort_values("class_index")[["class_index", "subtype_group", "images", "patients", "subtypes"]]


def multi_subtype_stems(index):
    per = index.groupby("patient_id")["subtype"].agg(lambda s: sorted(set(s)))
    return {p: s for p, s in per.items() if len(s) > 1}


def merged_slides(index):
    per = index.groupby("patient_id")["slide_id"].agg(lambda s: sorted(set(s)))
    return {p: s for p, s in per.items() if len(s) > 1}


def print_summary(index, excluded, min_images):
    s = dict(summary_table(index).itertuples(index=False))
    log("=== Dataset Summary ===")
    log(f"Total Patients (by stem): {s['total_patients_by_stem']}")
    log(f"Slide folders: {s['slide_folders']}")
    log(f"Benign Patients: {s['benign_patients']}")
    log(f"Malignant Patients: {s['malignant_patients']}")
    log(f"Total Images: {s['total_images']}")
    if len(excluded):
        log(f"Excluded images: {len(excluded)} (see tables/excluded_images.csv)")
    log(f"Images per Class: {as_dict(index['class_name'].value_counts())}")
    log(f"Images per Magnification: {as_dict(mag_counts(index))}")
    log("Images per Magnification per Class:")
    log(mag_class_table(index).rename_axis(None).rename_axis(None, axis=1).to_string())
    log("Top Tumor Subtypes:")
    log(subtype_table(index).to_string())
    for stem, subtypes in multi_subtype_stems(index).items():
        log(f"Patient {stem} has images under {len(subtypes)} subtypes: {', '.join(subtypes)}")
    for stem, slides in merged_slides(index).items():
        log(f"Slides {', '.join(slides)} are one patient ({stem})")
    log(f"Subtype classes for the subtype head (subtypes under {min_images} images -> Other):")
    log(group_table(index).to_string(index=False))


def plot_distribution(index, path):
    """Images per magnification and class, images and patients per subtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"benign": "#4C9F70", "malignant": "#C44E52"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    mag_class_table(index).plot.bar(ax=axes[0], color=[colors[c] for c in mag_class_table(index).columns], rot=0)
    axes[0].set(title="Images per magnification", xlabel="", ylabel="images")
    axes[0].legend(title=None)
    subtypes = subtype_table(index).iloc[::-1]
    bar_colors = [colors[c] for c in subtypes["Class"]]
    axes[1].barh(subtypes["Tumor Subtype"], subtypes["Total Images"], color=bar_colors)
    axes[1].set(title="Images per subtype", xlabel="images")
    axes[2].barh(subtypes["Tumor Subtype"], subtypes["Patients (by stem)"], color=bar_colors, label="patients (stem)")
    axes[2].barh(subtypes["Tumor Subtype"], subtypes["Slides"], fill=False, edgecolor="black", label="slide folders")
    axes[2].set(title="Patients per subtype", xlabel="count")
    axes[2].legend(loc="lower right")
    for ax in axes:
        ax.grid(axis="x" if ax is not axes[0] else "y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_tables(index, excluded, cfg):
    tables = tables_dir(cfg)
    stems = multi_subtype_stems(index)
    write_csv(excluded, tables / "excluded_images.csv", index=False)
    write_csv(summary_table(index), tables / "dataset_summary.csv", index=False)
    write_csv(mag_class_table(index), tables / "images_per_magnification_class.csv")
    write_csv(subtype_table(index), tables / "subtype_summary.csv", index=False)
    write_csv(group_table(index), tables / "subtype_groups.csv", index=False)
    write_csv(pd.DataFrame([(p, "|".join(s)) for p, s in stems.items()], columns=["patient_id", "subtypes"]),
              tables / "multi_subtype_patients.csv", index=False)


def run_analyze(cfg):
    """Stage: index + validate the images, print and save the dataset summary."""
    index, excluded = build_index(cfg.data_root, cfg.subtype_min_images)
    base = find_base(Path(cfg.data_root))
    if is_synthetic(base) and not cfg.synthetic:
        warn(f"{cfg.data_root} holds SYNTHETIC images (found {MARKER}); results will not describe BreakHis.")
    path = index_path(cfg)
    write_csv(index, path, index=False)
    save_tables(index, excluded, cfg)
    print_summary(index, excluded, cfg.subtype_min_images)
    warning = subtype_warning(index, cfg.subtype_min_images)
    if warning:
        warn(warning)
    plot_distribution(index, plots_dir(cfg) / "dataset_distribution.png")
    log(f"Index of {len(index)} images written to {path}")

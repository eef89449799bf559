"""scripts/compare.py's machinery: the grid, the baselines' planning, the results CSV, summaries and plots."""

from __future__ import annotations

import dataclasses
import math
import os

import pandas as pd

from rigl_harness import atomic, zoo
from rigl_harness.runner import SPARSE_METHODS, Config, exclusion_note, run, structure_exclusions

ALL_METHODS = ("dense", "dense_flops", "small_dense", "static", "set", "snfs", "rigl", "prune")
DENSE_ONLY = ("dense",)  # independent of the sparsity
COLUMNS = [
    "run_id", "dataset", "model", "method", "structure", "unstructured_layers", "sparsity", "seed", "multiplier", "epochs", "steps",
    "batch_size", "width", "accuracy", "loss", "train_flops", "inference_flops", "f_dense", "params", "params_total",
    "sparsity_actual", "sparsity_all_kernels", "dense_layers", "wall_time_s", "tflite_bytes", "tflite_agreement",
    "mask_updates", "status",
]
STRUCTURED_METHODS = SPARSE_METHODS  # run once per --structures entry; the baselines and TFMOT pruning once
LABELS = {
    "dense": "Dense", "dense_flops": "Dense (same train FLOPs as RigL)", "small_dense": "Small-Dense",
    "static": "Static", "set": "SET", "snfs": "SNFS", "rigl": "RigL", "prune": "Pruning (TFMOT)",
}


@dataclasses.dataclass(frozen=True)
class Job:
    method: str
    sparsity: float
    seed: int
    multiplier: float
    structure: str = "none"  # keras_rigl's spelling ("1x4", "2:4", "fan_in"); "none": unstructured
    unstructured_layers: tuple = ()  # layers sparse without the structure (--unstructured-layers)

    @property
    def method_part(self):
        """``rigl``, ``rigl@2:4``, ``rigl@2:4+plain-fc1``: the run id's method part, also the progress label."""
        # the structure joins the method part only when there is one: unstructured ids (and the rows of
        # results.csv files written before structures existed) stay as they were
        if self.structure == "none":
            return self.method
        plain = "+plain-" + "-".join(self.unstructured_layers) if self.unstructured_layers else ""
        return f"{self.method}@{self.structure}{plain}"

    def run_id(self, args):
        return f"{study_key(args)}|{self.method_part}|s{self.sparsity:g}|x{self.multiplier:g}|seed{self.seed}"


def study_key(args):
    """What every run of one study shares: data, model, length and hyperparameters (the run id's prefix)."""
    return (f"{os.path.basename(args.dataset)}|{args.model}|e{args.epochs}|b{args.batch_size}|lr{args.lr:g}"
            f"|dt{args.update_freq}|df{args.drop_fraction:g}|{args.distribution}")


def grid(methods, sparsities, seeds, multipliers, structures=("none",), unstructured_layers=()):
    """All jobs, seed-major (a stopped comparison has whole seeds done first).

    The sparse-from-scratch methods run once per structure; the dense baselines and TFMOT pruning
    (which has no structured variant) once, unstructured. ``unstructured_layers`` go with every
    structured job (an unstructured one has nothing to leave out).
    """
    jobs = []
    for seed in seeds:
        for m in multipliers:
            for method in methods:
                if method in DENSE_ONLY:
                    jobs.append(Job(method, 0.0, seed, m))
                elif method in STRUCTURED_METHODS:
                    jobs.extend(Job(method, s, seed, m, st, () if st == "none" else tuple(unstructured_layers))
                                for st in structures for s in sparsities)
                else:
                    jobs.extend(Job(method, s, seed, m) for s in sparsities)
    return jobs


def label(method, structure="none"):
    """The method's name in the summary and the plots: "RigL", "RigL (1x4)"."""
    name = LABELS.get(method, method)
    return name if structure in ("none", None) or structure != structure else f"{name} ({structure})"


def read_results(path):
    if not os.path.exists(path):
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path)
    missing = [c for c in ("run_id", "accuracy") if c not in df.columns]
    if missing:
        raise ValueError(f"{path!r} is not a results file of this script (no columns {missing}); use another --out.")
    return _with_structure(df).drop_duplicates("run_id", keep="last")


def _with_structure(df):
    """Rows from a results.csv written before structures existed are unstructured ("none")."""
    df = df.copy()
    df["structure"] = df["structure"].fillna("none").astype(str) if "structure" in df else "none"
    return df


def _series_structure(df):
    """The summary's structure column: ``"2:4, fc1 unstructured"`` for runs with --unstructured-layers, so
    that they are their own row, label and colour; ``"2:4"`` otherwise."""
    if "unstructured_layers" not in df:
        return df
    df = df.copy()
    plain = df["unstructured_layers"].fillna("").astype(str)
    named = plain != ""
    df.loc[named, "structure"] = (df.loc[named, "structure"] + ", " + plain[named].str.replace(";", ", ")
                                  + " unstructured")
    return df


def write_results(df, path):
    """Replace the CSV atomically (temp file in the same folder, fsync, os.replace)."""
    atomic.write_csv(path, df)


class Planner:
    """Per-sparsity quantities the baselines need: the RigL run's FLOPs and the sparse net's parameter count."""

    def __init__(self, args, data):
        self.args, self.data = args, data
        self._cache = {}

    def sparse_stats(self, sparsity):
        if sparsity not in self._cache:
            import keras

            import keras_rigl

            dense = zoo.build_model(self.args.model, self.data.input_shape, self.data.num_classes)
            sparse = keras_rigl.sparsify(dense, sparsity, distribution=self.args.distribution, seed=0)
            # RigL's training FLOPs per example seen, at this sparsity (the FLOPs-matched baseline's budget)
            rigl = keras_rigl.training_flops_summary(sparse, "rigl", 1, update_freq=self.args.update_freq)
            params = keras_rigl.count_nonzero_params(sparse)
            width = zoo.width_for_params(self.args.model, self.data.input_shape, self.data.num_classes, params)
            self._cache[sparsity] = {"f_sparse": rigl["f_sparse"], "f_dense": rigl["f_dense"],
                                     "rigl_flops_per_example": rigl["train_flops"], "params": params, "width": width}
            keras.backend.clear_session()
        return self._cache[sparsity]

    def config(self, job):
        a = self.args
        method = job.method
        cfg = Config(
            dataset=a.dataset, model=a.model, method=method, sparsity=job.sparsity or 0.9,
            distribution=a.distribution, update_freq=a.update_freq, drop_fraction=a.drop_fraction,
            epochs=a.epochs, multiplier=job.multiplier, lr=a.lr, batch_size=a.batch_size, seed=job.seed,
            save=False, tflite=not a.no_tflite, verbose=0, structure=job.structure,
            unstructured_layers=job.unstructured_layers,
        )
        if method in ("dense_flops", "small_dense", "dense"):
            cfg.method = "dense"
        if method == "dense_flops":
            st = self.sparse_stats(job.sparsity)
            epochs = max(1, int(round(a.epochs * job.multiplier)))
            examples = epochs * math.ceil(len(self.data.x_train) / a.batch_size) * a.batch_size
            target = st["rigl_flops_per_example"] * examples
            cfg.steps = equal_flops_steps(target, st["f_dense"], a.batch_size)
        if method == "small_dense":
            cfg.width = self.sparse_stats(job.sparsity)["width"]
        return cfg


def equal_flops_steps(target_flops, f_dense, batch_size):
    """Optimizer steps a dense run (3 f_D per example) may take to spend ``target_flops`` (at least 1)."""
    return max(1, int(round(target_flops / (3.0 * f_dense * batch_size))))


def run_job(job, planner, args):
    import keras

    keras.backend.clear_session()
    cfg = planner.config(job)
    r = run(cfg, data=planner.data)
    return {
        "run_id": job.run_id(args), "dataset": r["dataset"], "model": args.model, "method": job.method,
        "structure": job.structure, "unstructured_layers": ";".join(job.unstructured_layers),
        "sparsity": job.sparsity, "seed": job.seed, "multiplier": job.multiplier, "epochs": r["epochs"],
        "steps": r["steps"], "batch_size": args.batch_size, "width": cfg.width, "accuracy": r["accuracy"],
        "loss": r["loss"], "train_flops": r["train_flops"], "inference_flops": r["inference_flops"],
        "f_dense": r["f_dense"], "params": r["params"], "params_total": r["params_total"],
        "sparsity_actual": r["sparsity"], "sparsity_all_kernels": r["sparsity_all_kernels"],
        "dense_layers": ";".join(r.get("dense_layers", [])),  # maskable layers the structure left dense
        "wall_time_s": r["wall_time_s"], "tflite_bytes": r["tflite_bytes"],
        "tflite_agreement": r.get("tflite_agreement"), "mask_updates": r["mask_updates"], "status": r["status"],
    }


# ------------------------------------------------------------------ summary
def _pm(mean, std, fmt):
    if std != std:  # NaN: one seed
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _full_width_f_dense(df):
    """Forward FLOPs of the full-width dense model (small-dense rows have a narrower one)."""
    full = df[df["width"] == 1] if "width" in df else df
    return float((full if len(full) else df)["f_dense"].max())


def summarize(df, dense_train=None):
    """Mean ± std over seeds per (method, structure, sparsity, multiplier).

    Training FLOPs are relative to ``dense_train`` (the dense 1x run's; default: the mean of the dense 1x
    rows), inference FLOPs to the dense model's forward FLOPs.
    """
    if "status" in df:  # a diverged run (non-finite loss) is not a result: it stays in the CSV, not the summary
        df = df[df["status"].fillna("ok") != "failed"]
    if df.empty:
        return pd.DataFrame()
    df = _series_structure(_with_structure(df))
    ref_flops = _full_width_f_dense(df)
    if dense_train is None:
        dense1 = df[(df["method"] == "dense") & (df["multiplier"] == 1)]
        dense_train = float(dense1["train_flops"].mean()) if len(dense1) else None
    rows = []
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    for (method, structure, sparsity, mult), g in df.groupby(["method", "structure", "sparsity", "multiplier"]):
        rows.append({
            "method": method, "structure": structure, "sparsity": sparsity, "multiplier": mult, "seeds": len(g),
            "acc_mean": g["accuracy"].mean(), "acc_std": g["accuracy"].std(),
            "loss_mean": g["loss"].mean(),
            "train_flops": g["train_flops"].mean(),
            "train_flops_rel": g["train_flops"].mean() / dense_train if dense_train else float("nan"),
            "inference_flops_rel": g["inference_flops"].mean() / ref_flops,
            "params": g["params"].mean(), "steps": g["steps"].mean(), "wall_time_s": g["wall_time_s"].mean(),
            "tflite_kb": g["tflite_bytes"].mean() / 1024 if g["tflite_bytes"].notna().any() else float("nan"),
            "_order": order.get(method, 99), "_structured": structure != "none",
        })
    # per sparsity: the unstructured methods as before, then each structure's methods
    out = pd.DataFrame(rows).sort_values(["multiplier", "sparsity", "_structured", "structure", "_order"])
    out = out.drop(columns=["_order", "_structured"])
    return out.reset_index(drop=True)


def to_markdown(summary):
    head = ["Method", "Sparsity", "Mult.", "Seeds", "Accuracy (%)", "Train FLOPs (× dense)", "Inference FLOPs (× dense)",
            "Params", "Steps", "TFLite KB", "Wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in summary.itertuples():
        lines.append("| " + " | ".join([
            label(r.method, r.structure), f"{r.sparsity:g}" if r.sparsity else "0", f"{r.multiplier:g}×", str(r.seeds),
            _pm(100 * r.acc_mean, 100 * r.acc_std, ".2f"), f"{r.train_flops_rel:.3f}", f"{r.inference_flops_rel:.3f}",
            f"{r.params:,.0f}", f"{r.steps:.0f}", "" if r.tflite_kb != r.tflite_kb else f"{r.tflite_kb:.1f}",
            f"{r.wall_time_s:.1f}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def _zoom(ax, summary, x_of):
    """Zoom the y axis on the methods that train fully; mark the points below it (short FLOPs-matched runs)."""
    acc = 100 * summary["acc_mean"]
    low = 100 * (summary["acc_mean"] - summary["acc_std"].fillna(0))
    main = summary["method"] != "dense_flops"
    if not main.any():
        ax.set_ylim(top=100.5)
        return
    bottom = max(0.0, float(low[main].min()) - 1.0)
    if (~main).any() and float(acc[~main].min()) >= bottom:  # nothing off the zoomed axis
        bottom = max(0.0, min(bottom, float(low[~main].min()) - 1.0))
    ax.set_ylim(bottom, 100.5)
    for r, a in zip(summary[~main].itertuples(), acc[~main]):
        if a < bottom:
            ax.annotate(f"{a:.1f}%", (x_of(r), bottom), xytext=(0, 12), textcoords="offset points", ha="center",
                        fontsize=7, color="C1", arrowprops=dict(arrowstyle="->", color="C1"))


def _series_colors(summary):
    """A colour per (method, structure): the methods' usual colours unstructured, other ones per structure."""
    colors = {(m, "none"): c for m, c in zip(ALL_METHODS, ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8"])}
    spare = ["C7", "C9", "navy", "crimson", "teal", "maroon", "gold", "lime", "black", "darkorange", "slateblue"]
    structured = sorted({(m, st) for m, st in zip(summary["method"], summary["structure"]) if st != "none"},
                        key=lambda k: (k[1], ALL_METHODS.index(k[0]) if k[0] in ALL_METHODS else 99))
    for i, key in enumerate(structured):
        colors[key] = spare[i % len(spare)]
    return colors


def plot(summary, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = _with_structure(summary)
    colors = _series_colors(summary)
    markers = {0.0: "*", 0.8: "o", 0.9: "s", 0.95: "^", 0.98: "D"}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in summary.itertuples():
        ax.errorbar(r.train_flops_rel, 100 * r.acc_mean, yerr=0 if r.acc_std != r.acc_std else 100 * r.acc_std,
                    fmt=markers.get(round(r.sparsity, 2), "o"), color=colors.get((r.method, r.structure)), capsize=2,
                    ms=7, mfc="none" if r.multiplier != 1 else colors.get((r.method, r.structure)))
    for method, structure in dict.fromkeys(zip(summary["method"], summary["structure"])):
        ax.plot([], [], "o", color=colors.get((method, structure)), label=label(method, structure))
    for s in sorted(summary["sparsity"].unique()):
        ax.plot([], [], markers.get(round(s, 2), "o"), color="black", label=f"sparsity {s:g}" if s else "dense (sparsity 0)")
    if (summary["multiplier"] != 1).any():
        ax.plot([], [], "o", color="black", mfc="none", label="hollow: trained longer (multiplier > 1)")
    _zoom(ax, summary, lambda r: r.train_flops_rel)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (× dense 1× run)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy vs training FLOPs (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p1 = os.path.join(out, "accuracy_vs_flops.png")
    atomic.write_file(p1, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (method, structure, mult), g in summary.groupby(["method", "structure", "multiplier"], sort=False):
        name = label(method, structure) + (f" {mult:g}×" if mult != 1 else "")
        style = "--" if mult != 1 else "-"
        color = colors.get((method, structure))
        if method in DENSE_ONLY:
            ax.axhline(100 * g["acc_mean"].iloc[0], ls=":" if mult == 1 else "-.", color=color, label=name)
            continue
        g = g.sort_values("sparsity")
        ax.errorbar(g["sparsity"], 100 * g["acc_mean"], yerr=100 * g["acc_std"].fillna(0), fmt="o" + style,
                    color=color, capsize=2, label=name)
    _zoom(ax, summary, lambda r: r.sparsity)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy vs sparsity per method (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p2 = os.path.join(out, "accuracy_vs_sparsity.png")
    atomic.write_file(p2, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)
    return p1, p2


def structure_notes(args, data, structures, jobs):
    """One line per structure that leaves layers of ``args.model`` dense (asked of the structure itself)."""
    wanted = [st for st in structures if st != "none" and any(j.structure == st for j in jobs)]
    if not wanted:
        return []
    import keras

    model = zoo.build_model(args.model, data.input_shape, data.num_classes)
    plain = getattr(args, "unstructured_layers", ())
    notes = [exclusion_note(st, structure_exclusions(model, st, plain)) for st in wanted]
    keras.backend.clear_session()
    return [n for n in notes if n]


def run_comparison(args, data, notes=()):
    """Run the pending jobs of the grid in ``args``, write results.csv, summary.md/.csv and the plots."""
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    df = read_results(csv_path)
    structures = getattr(args, "structures", ["none"])
    jobs = grid(args.methods, args.sparsities, args.seeds, args.multipliers, structures,
                getattr(args, "unstructured_layers", ()))
    done = set(df["run_id"])
    pending = [j for j in jobs if j.run_id(args) not in done]
    notes = list(notes) + structure_notes(args, data, structures, jobs)
    for note in notes:
        print(note)
    print(f"{len(jobs)} runs in the grid, {len(jobs) - len(pending)} already in {csv_path}, {len(pending)} to go.")
    planner = Planner(args, data)
    bar = None
    if not args.no_progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), unit="run", dynamic_ncols=True)
    for job in pending:
        if bar is not None:
            bar.set_description(f"{job.method_part} s={job.sparsity:g} x{job.multiplier:g} seed={job.seed}")
        row = run_job(job, planner, args)
        if row["status"] != "ok":
            print(f"warning: run {row['run_id']} failed (non-finite loss); it is left out of the summary.")
        df = pd.concat([df[df["run_id"] != row["run_id"]], pd.DataFrame([row])], ignore_index=True)
        write_results(df[[c for c in COLUMNS if c in df.columns]], csv_path)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{row['accuracy']:.4f}")
    if bar is not None:
        bar.close()
    # the summary covers every run of this study in the CSV (same data, model, epochs, hyperparameters), so
    # several invocations (e.g. a later --multipliers 2) add up to one table
    study = df[df["run_id"].str.startswith(study_key(args) + "|")]
    current = df[df["run_id"].isin({j.run_id(args) for j in jobs})]
    dense_train = None
    if len(study):  # the dense 1x run's training FLOPs: 3 f_D x (epochs x batches x batch size)
        examples = args.epochs * math.ceil(len(data.x_train) / args.batch_size) * args.batch_size
        dense_train = 3.0 * _full_width_f_dense(study) * examples
    summary = summarize(study, dense_train=dense_train)
    md = to_markdown(summary) if len(summary) else "(no runs)\n"
    atomic.write_text(os.path.join(args.out, "summary.md"), md)
    atomic.write_csv(os.path.join(args.out, "summary.csv"), summary)
    if len(summary):
        plot(summary, args.out)
    print(md)
    return {"results": current, "summary": summary, "ran": len(pending), "csv": csv_path}



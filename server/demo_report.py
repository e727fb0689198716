"""The demo's summary table (terminal) and OUT/report/index.html (plots a person can open)."""

from __future__ import annotations

from pathlib import Path

from sdr_edge.report.html import Section, read_sections, update_index


def infer_accuracy(infer: dict) -> float | None:
    """Accuracy of `sdr-client infer --json` predictions on a folder with class sub-folders."""
    preds = infer.get("predictions", [])
    if not preds:
        return None
    return sum(Path(p["path"]).parent.name == p["label"] for p in preds) / len(preds)


def summary_rows(summary: dict) -> list[list[str]]:
    rows = [["step", "result"]]
    rows.append(["pre-training (train)", f"{summary['steps'].get('train', 0):.0f} s"])
    for name, c in summary.get("clients", {}).items():
        rows.append([f"{name}: signature -> route",
                     f"{c['images']} images, {c['signature_bytes']} B -> {tuple(c['route'])}"])
    fed = summary.get("federation", {})
    if fed:
        accs = [r.get("accuracy") for r in fed.get("rounds", []) if r.get("accuracy") is not None]
        rows.append(["federation: route", str(tuple(fed.get("route", ())))])
        if accs:
            rows.append(["federation: accuracy per round",
                         " -> ".join(f"{100 * a:.1f}%" for a in accs)])
        rows.append(["federation: bundle verifies", str(fed.get("bundle_verified", False))])
    for precision, doc in summary.get("exports", {}).items():
        # each check named: the int8 row starts with the fp32 graph's check before conversion
        checks = "; ".join(f"{c['name']}: {c['detail']}" for c in doc.get("checks", []))
        rows.append([f"export {precision}", checks])
    for precision, infer in summary.get("infer", {}).items():
        acc = infer_accuracy(infer)
        thr = infer.get("throughput", {})
        rows.append([f"infer {precision} (client-b test)",
                     f"{'n/a' if acc is None else f'{100 * acc:.1f}%'} accuracy, "
                     f"{thr.get('model_images_per_s', 0):.0f} images/s (model only)"])
    rows.append(["total", f"{summary.get('total_seconds', 0):.0f} s"])
    return rows


def print_summary(summary: dict) -> None:
    rows = summary_rows(summary)
    width = max(len(r[0]) for r in rows)
    print("\n\033[1msdr-edge demo summary\033[0m")
    for step, result in rows[1:]:
        print(f"  {step.ljust(width)}  {result}")


def _training_sections(out: Path) -> list[Section]:
    """The run's own report sections, re-pointed from OUT/run/report to OUT/report."""
    sections = []
    for s in read_sections(out / "run" / "report"):
        s.images = [f"../run/report/{p}" for p in s.images]
        s.key = f"training:{s.key}"
        sections.append(s)
    return sections


def write_demo_report(out: Path, summary: dict) -> Path:
    report = out / "report"
    sections = [Section("Demo summary", text="Every step ran as a real process on loopback "
                        "(see OUT/logs/).", table=summary_rows(summary), key="demo-summary")]
    sections += _training_sections(out)
    clients = summary.get("clients", {})
    if clients:
        levels = max(len(c["level1"]) for c in clients.values())
        table = [["client", "images", "signature bytes", "route", "level-1 distribution"]]
        for name, c in clients.items():
            dist = " ".join(f"{v:.2f}" for v in c["level1"])
            table.append([name, c["images"], c["signature_bytes"], tuple(c["route"]), dist])
        sections.append(Section("Routing: client signatures and their sub-nets", table=table,
                                text=f"Each signature is the mean probability of every code "
                                f"digit per level ({levels} digits at level 1 shown).",
                                key="demo-routing"))
    fed = summary.get("federation", {})
    if fed:
        images = [f"../{fed['plot']}"] if fed.get("plot") else []
        table = [["round", "accuracy", "loss"]] + [
            [r["round"], "" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%",
             "" if r.get("loss") is None else f"{r['loss']:.3f}"] for r in fed.get("rounds", [])]
        sections.append(Section("Federated fine-tuning (Flower, FedAvg)", images, table=table,
                                text=f"Route {tuple(fed.get('route', ()))}; bundle: "
                                f"{fed.get('bundle')}", key="demo-federation"))
    exports = summary.get("exports", {})
    if exports:
        table = [["precision", "check", "value", "bound", "passed"]]
        for precision, doc in exports.items():
            for c in doc.get("checks", []):
                table.append([precision, c["name"], f"{c['value']:.4g}", f"{c['bound']:.4g}",
                              c["passed"]])
        for precision, infer in summary.get("infer", {}).items():
            thr = infer.get("throughput", {})
            acc = infer_accuracy(infer)
            table.append([precision, "infer accuracy / images/s",
                          "n/a" if acc is None else f"{100 * acc:.1f}%",
                          f"{thr.get('model_images_per_s', 0):.0f}/s", ""])
        sections.append(Section("Export parity and on-device inference", table=table,
                                key="demo-export"))
    return update_index(report, sections, title="sdr-edge demo")

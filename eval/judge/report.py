"""judge.json (everything), judge.md (the tables) and judge.html (the tables and two plots: accuracy
with intervals per criterion and judge; win rates as a forest plot). A judge under the trust bar is
marked "not trusted" beside every figure that rests on it."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def _cell(x: list[float], signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(x[0])} [{fmt.format(x[1])}, {fmt.format(x[2])}]"


def cards(result: dict) -> list[str]:
    """One card per judge: what it can be trusted for, on which figure, at what cost."""
    lines = ["## Judge cards", "",
             "Trusted for a criterion when the out-of-distribution accuracy's lower bound (95 % Wilson) reaches "
             f"the trust bar ({result['trust_bar']:.0%}) and its verdicts flip with the order at most 10 % of the "
             "time. In-distribution: known-answer cases of the calibration users (never trained on). A judge that "
             "learned nothing from known-answer cases meets them out of its distribution, so the two figures are "
             "one; a head judge's out-of-distribution figure is the lower of its accuracies with each case's "
             "perturbation kind held out of training and with its word held out; an adapter judge's is not "
             "measured.", ""]
    per_case = result["timing"].get("seconds_per_case", {})
    for judge, report in result["judges"].items():
        trusted = [c for c, a in report["criteria"].items() if a["trusted"]]
        cost = f"{per_case[judge]:.3f} s a case" if judge in per_case else "cost of its members"
        lines += [f"### {judge}: trusted for {', '.join(trusted) if trusted else 'nothing'} ({cost})", "",
                  "| criterion | trusted | out-of-distribution | in-distribution | flip rate | tie rate | chance |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: |"]
        for criterion, acc in report["criteria"].items():
            ood = acc.get("out_of_distribution")
            held = acc.get("held_out")
            ood_cell = "not measured" if not ood else _cell(ood) + (
                f" (kinds {held['kinds'][0]:.2f}, words {held['words'][0]:.2f})" if held else "")
            flip = "—" if acc["flip_rate"] is None else f"{acc['flip_rate']:.2f}"
            lines.append(f"| {criterion} | {'yes' if acc['trusted'] else 'no'} | {ood_cell} | "
                         f"{_cell(acc['accuracy'])} | {flip} | {acc['tie_rate']:.2f} | "
                         f"{acc['chance']['random']:.2f} |")
        lines.append("")
    return lines


def tables(result: dict) -> str:
    lines = [f"# Judge suite {result['suite']}", "",
             f"{result['users']['compared']} compared users, {result['users']['calibration']} calibration users "
             f"(disjoint); trust bar {result['trust_bar']:.0%}; {result['timing']['cases']} cases, "
             f"{result['timing']['cases_per_minute']} cases/min judged; {result['timing']['seconds']} s in all.", "",
             *cards(result),
             "## Judge accuracy on known-answer cases (95 % Wilson interval)", "",
             "Trusted: the interval's lower bound reaches the trust bar. Chance: a judge answering at random "
             "(a constant or position-bound judge scores 0).", "",
             "| judge | criterion | accuracy | chance | cases | flip rate | tie rate | failures | trusted |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for judge, report in result["judges"].items():
        for criterion, acc in report["criteria"].items():
            flip = "—" if acc["flip_rate"] is None else f"{acc['flip_rate']:.2f}"
            mark = "yes" if acc["trusted"] else "**not trusted**"
            lines.append(f"| {judge} | {criterion} | {_cell(acc['accuracy'])} | {acc['chance']['random']:.2f} | "
                         f"{acc['cases']} | {flip} | "
                         f"{acc['tie_rate']:.2f} | {acc['failures']} | {mark} |")
    truths = [(j, r["ranking_truth"]) for j, r in result["judges"].items() if "ranking_truth" in r]
    if truths:
        lines += ["", "Ranking truth (not a known answer): how often each judge prefers the calibration page holding "
                  "the shopper's held-out next item to the same page without it.", ""]
        lines += [f"- {j}: {_cell(t['prefers_next_item'])} of {t['cases']} pages" for j, t in truths]
    lines += ["", "## Comparisons (paired bootstrap 95 % intervals over users)", "",
              "Pairwise: the left configuration's win rate (a tie counts half). Pointwise: the left's mean score "
              "minus the right's.", "",
              "| judge | comparison | criterion | figure | users | next-item agreement | judge trusted |",
              "| --- | --- | --- | --- | ---: | --- | --- |"]
    for judge, report in result["judges"].items():
        for title, rates in report["comparisons"].items():
            for criterion, e in rates.items():
                figure = (f"win rate {_cell(e['win_rate'])}" if "win_rate" in e
                          else f"score diff {_cell(e['mean_score_difference'], True)}")
                nxt = e.get("prefers_next_item")
                agree = f"{_cell(nxt['rate'])} of {nxt['users']}" if nxt and nxt["users"] else "—"
                mark = "yes" if e["trusted"] else "**not trusted**"
                lines.append(f"| {judge} | {title} | {criterion} | {figure} | {e['users']} | {agree} | {mark} |")
    lines += ["", f"Pages: {json.dumps(result['pages']['paths'])}"]
    return "\n".join(lines) + "\n"


def _plots(result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{j} · {c}", a["accuracy"], a["trusted"]) for j, r in result["judges"].items()
            for c, a in r["criteria"].items()]
    forest = [(f"{j} · {t} · {c}", e.get("win_rate") or e["mean_score_difference"], e["trusted"], "win_rate" in e)
              for j, r in result["judges"].items() for t, rates in r["comparisons"].items() for c, e in rates.items()]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * max(len(rows), len(forest)) + 1.5))
    panels = ((axes[0], rows, "known-answer accuracy"),
              (axes[1], [(n, v, t) for n, v, t, _ in forest], "win rate (pairwise) / score difference (pointwise)"))
    for ax, data, title in panels:
        for y, (_, (value, low, high), trusted) in enumerate(data):
            ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o",
                        color="tab:blue" if trusted else "tab:red", capsize=3)
        ax.set_yticks(range(len(data)), [n for n, _, _ in data], fontsize=8)
        ax.set_title(title + " (red: judge not trusted)", fontsize=9)
        ax.invert_yaxis()
    axes[0].axvline(result["trust_bar"], color="grey", ls="--", lw=0.8)
    axes[1].axvline(0.5, color="grey", lw=0.5)
    axes[1].axvline(0.0, color="grey", lw=0.5)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def write_report(result: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge.json").write_text(json.dumps(result, indent=1) + "\n")
    text = tables(result)
    (out / "judge.md").write_text(text)
    body = "".join(f"<pre>{html.escape(block)}</pre>" for block in text.split("\n\n"))
    (out / "judge.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>Judge suite {html.escape(result['suite'])}</title>"
        f"<img alt='accuracy and win rates' src='data:image/png;base64,{_plots(result)}'>{body}\n")

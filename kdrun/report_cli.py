"""``kdrun report DIR [--out DIR2] [--top N]``: the report of a run, a sweep or a tree of them."""

from __future__ import annotations

from kdrun.errors import ConfigError

USAGE = """usage: kdrun report DIR [--out DIR2] [--top N]

Finds every run under DIR (a run directory, a multirun directory or any folder
holding them), writes report.md, report.csv and PNG plots into DIR (or DIR2)
and prints the first runs of its order: by the distilled student's validation
top-1 when every run holds a validation split, else by its test top-1 (an
order for reading; choose settings on validation figures only).

  --out DIR2   write the report files here instead of DIR
  --top N      rows of the table to print (default 10; the files hold all)"""

PRINTED_COLUMNS = ["student_top1", "baseline_top1", "kd_gain_top1", "kd_gain_p", "agreement", "wall_s"]
VAL_COLUMNS = ["student_val_top1", "vs_best_val", "vs_best_val_p"]  # printed when some run has them


def parse_args(args: list[str]) -> dict:
    """``{"dir", "out", "top"}`` from the command line; ConfigError on anything else."""
    opts: dict = {"dir": None, "out": None, "top": "10"}
    it = iter(args)
    for arg in it:
        name, eq, inline = arg.partition("=")
        if name in ("--out", "--top"):
            value = inline if eq else next(it, None)
            if not value:
                raise ConfigError(f"report {name}: needs a value ({name} {'DIR' if name == '--out' else 'N'})")
            opts[name[2:]] = value
        elif arg.startswith("-"):
            raise ConfigError(f"report {arg}: unknown option; valid: --out DIR, --top N, --help")
        elif opts["dir"] is None:
            opts["dir"] = arg
        else:
            raise ConfigError(f"report {arg}: only one DIR is allowed (got {opts['dir']} already)")
    return _checked(opts)


def _checked(opts: dict) -> dict:
    if opts["dir"] is None:
        raise ConfigError("report: missing DIR; usage: kdrun report DIR [--out DIR2] [--top N]")
    if not opts["top"].isdigit() or int(opts["top"]) < 1:
        raise ConfigError(f"report --top {opts['top']}: must be a whole number >= 1")
    opts["top"] = int(opts["top"])
    return opts


def report_main(args: list[str]) -> int:
    """Write the report and print its best rows and the files written; exit code 0."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from kdrun.export import export_table, input_line, read_export
    from kdrun.sweep_report import RANKED_BY, build, text_table

    opts = parse_args(args)
    rep = build(opts["dir"], opts["out"])
    val = [c for c in VAL_COLUMNS if any(row.get(c) is not None for row in rep.rows)]
    columns = ["run", *rep.swept, "status", *PRINTED_COLUMNS, *val]
    shown = min(opts["top"], len(rep.rows))
    order = "best" if rep.ranked_by == "student_val_top1" else "top"
    runs = f"{len(rep.rows)} run{'' if len(rep.rows) == 1 else 's'}"
    print(f"{runs} under {opts['dir']} ({order} {shown} by {RANKED_BY[rep.ranked_by]}):")
    print(text_table(rep.rows, columns, limit=opts["top"]))
    for row in rep.rows[: opts["top"]]:  # what the table cannot say: the best's choice, a failure, a stop
        if row.get("note"):
            print(f"  {row['run']}: {row['note']}")
    if rep.groups:
        from kdrun.sweep_report import interval, pm

        print(f"{len(rep.groups)} settings repeated over seeds (mean ± std, KD gain with its 95% t-interval):")
        for g in rep.groups:
            setting = " ".join(f"{k}={g[k]}" for k in rep.swept if k in g) or "all runs"
            print(
                f"  {setting} (n={g['n']}): student {pm(g['student_top1_mean'], g['student_top1_std'])}, "
                f"baseline {pm(g['baseline_top1_mean'], g['baseline_top1_std'])}, "
                f"teacher {pm(g['teacher_top1_mean'], g['teacher_top1_std'])}, "
                f"KD gain {pm(g['kd_gain_top1_mean'], g['kd_gain_top1_std'])} pt, "
                f"95% CI {interval(g['kd_gain_top1_ci95_low'], g['kd_gain_top1_ci95_high'])}"
            )
    exported = read_export(opts["dir"])
    if exported:
        print("export (export/export.json):")
        print(export_table(exported))
        if "input" in exported:
            print(input_line(exported["input"]))
    print("written:")
    for path in rep.paths:
        print(f"  {path}")
    return 0

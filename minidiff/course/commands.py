"""The course's subcommands of `minidiff`, added through the "minidiff.commands" entry point (pyproject.toml):

    minidiff course init DIR [--solutions]                            the workbook: a file per lesson to fill in
    minidiff milestones [--workbook DIR | --reference | --NAME FILE.py:FUNCTION ...]   your workbook, checked
    minidiff sampler-table [--model shapes] [--prompts 200] [--grid samplers.png]
"""

from minidiff.checks import check_device, check_float, check_int, check_seed, check_text
from minidiff.cli.options import output_format
from minidiff.files import atomic_save, check_writable


def cmd_sampler_table(args):
    from minidiff.course.evaluate import format_table, held_out_prompts, sampler_table, save_grid
    from minidiff.pipeline import load_pipeline

    check_text("--model", args.model)
    check_device(args.device)
    check_int("--prompts", args.prompts, 1, 100000)
    check_int("--batch", args.batch, 1, 1000, "the prompts per batch, e.g. 50")
    check_float("--guidance", args.guidance)
    check_seed(args.seed, "--seed")
    if args.grid:
        output_format("--grid", args.grid, {".png": "PNG", ".pdf": "PDF", ".svg": "SVG"})  # what matplotlib writes
        check_writable(args.grid, overwrite=args.overwrite)
    pipe = load_pipeline(args.model, device=args.device)
    results, images = sampler_table(pipe, args.prompts, args.guidance, args.seed, args.batch)
    print(f"{pipe.source}: {args.prompts} held-out prompts, guidance {args.guidance}, seed {args.seed}")
    print(format_table(results, args.prompts))
    if args.grid:
        atomic_save(args.grid, lambda p: save_grid(images, held_out_prompts(args.prompts, args.seed), p))
        print(f"wrote {args.grid}")


def cmd_milestones(args):
    from minidiff.course.milestones import main as milestones_main

    return milestones_main(args.options)  # 1 when a milestone failed, after the checklist is printed


def cmd_course_init(args):
    from minidiff.course.workbook import init

    written = init(args.folder, solutions=args.solutions)
    kind = "filled (the solutions)" if args.solutions else "blank: each function raises NotImplementedError"
    print(f"wrote {len(written)} lesson files to {args.folder} ({kind}):")
    for path in written:
        print(f"  {path}")
    print(f"check them with `minidiff milestones --workbook {args.folder}`; the notebooks find the workbook as "
          "a workbook/ folder beside them or through $MINIDIFF_WORKBOOK")


def add_commands(sub) -> None:
    """Add `course`, `milestones` and `sampler-table` to the `minidiff` command's subparsers."""
    course = sub.add_parser("course", help="the course's workbook: `minidiff course init DIR`")
    course_sub = course.add_subparsers(dest="course_command", required=True)
    init = course_sub.add_parser("init", help="write the workbook: one Python file per lesson, the functions it asks "
                                 "you to write, each raising NotImplementedError until you do")
    init.add_argument("folder", help="the folder to write (created if missing; existing lesson files are kept)")
    init.add_argument("--solutions", action="store_true", help="write the filled workbook instead")
    init.set_defaults(run=cmd_course_init)

    t = sub.add_parser("sampler-table", help="the samplers side by side on a shapes model: held-out adherence, "
                       "difference to DDIM 50, time")
    t.add_argument("--model", default="shapes", help="a shapes model: a known name or a path (default: shapes)")
    t.add_argument("--prompts", type=int, default=200, help="held-out prompts per sampler")
    t.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=50, help="prompts per batch")
    t.add_argument("--grid", help="also write a PNG: a row of pictures per sampler")
    t.add_argument("--overwrite", action="store_true", help="replace the --grid file if it exists")
    t.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    t.set_defaults(run=cmd_sampler_table)

    # its options (--only, --ddim-step FILE.py:FUNCTION, ...) are parsed by minidiff.course.milestones, so that
    # building this parser does not import torch; prefix_chars="+" lets every "--option" through to it untouched
    m = sub.add_parser("milestones", prefix_chars="+", add_help=False,
                       help="check your workbook (--workbook DIR), minidiff itself (--reference) or one function "
                       "(--NAME FILE.py:FUNCTION); see --help")
    m.add_argument("options", nargs="*")
    m.set_defaults(run=cmd_milestones)

"""The course's subcommands of `minidiff`, added through the "minidiff.commands" entry point (pyproject.toml):

    minidiff milestones [--ddim-step my_code.py:my_ddim_step ...]     the course checklist, your code against it
    minidiff sampler-table [--model shapes] [--prompts 200] [--grid samplers.png]
"""

from minidiff.checks import check_device, check_float, check_int, check_seed, check_text
from minidiff.cli import output_format
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


def add_commands(sub) -> None:
    """Add `milestones` and `sampler-table` to the `minidiff` command's subparsers."""
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
                       help="the course checklist; check your own code with --NAME FILE.py:FUNCTION (see --help)")
    m.add_argument("options", nargs="*")
    m.set_defaults(run=cmd_milestones)

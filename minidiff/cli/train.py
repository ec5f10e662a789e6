"""`minidiff train lora | textual-inversion`: teach a loaded model something new from a folder of captioned pictures.

    minidiff train lora FOLDER [--out lora.safetensors] [--model shapes] [--steps 300] [--rank 4] [--resume FILE]
    minidiff train lora FOLDER --token "<my-word>" [--word-lr 5e-3]   # pivotal: the word + a LoRA on the UNet
    minidiff train textual-inversion FOLDER --token "<my-word>" [--out embedding.safetensors] [--vectors 1]

FOLDER holds pictures, each with a caption file of the same name (red_1.png + red_1.txt). Besides --out, the run
writes its loss curve (--loss-curve, default OUT.loss.png) and a checkpoint every --save-every steps (--checkpoint,
default OUT.checkpoint.safetensors), from which --resume continues exactly. The training is minidiff.finetune.
"""

from pathlib import Path

from minidiff.checks import check_device, check_float, check_input_file, check_int, check_seed, check_text, shown
from minidiff.cli.options import check_outputs, output_format
from minidiff.errors import InputError

ADAPTER_FORMATS = {".safetensors": "safetensors"}
CURVE_FORMATS = {".png": "PNG"}


def add_commands(sub):
    train = sub.add_parser("train", help="train a LoRA or a new word (textual inversion) on captioned pictures")
    methods = train.add_subparsers(dest="method", required=True)
    for name, help_text in (("lora", "a LoRA beside the UNet's attention and the text encoder's layers (with "
                                     "--token: a new word and a LoRA on the UNet alone)"),
                            ("textual-inversion", "a new word: embedding rows for a new token")):
        p = methods.add_parser(name, help=help_text)
        p.add_argument("folder", help="pictures, each with a caption file of the same name (red_1.png + red_1.txt)")
        if name == "textual-inversion":
            p.add_argument("--token", required=True, help="the new word, as the captions write it, e.g. <my-word>")
        else:
            p.add_argument("--token", help="pivotal tuning: learn this new word (as the captions write it, e.g. "
                           "<my-word>) with a LoRA on the UNet alone, the text encoder untouched; the file carries "
                           "the word (kohya's bundle_emb), and prompts without it keep their text states")
            p.add_argument("--rank", type=int, default=4, help="the LoRA's inner width (default 4)")
            p.add_argument("--alpha", type=float, help="the LoRA's alpha (default: = rank)")
            p.add_argument("--word-lr", type=float, default=5e-3, help="with --token: the word's learning rate "
                           "(default 5e-3)")
        p.add_argument("--vectors", type=int, default=1, help="embedding rows of the word (default 1)")
        p.add_argument("--init-word", help="start the word from this word's embedding (default: the table's mean)")
        p.add_argument("--out", default=f"{'lora' if name == 'lora' else 'embedding'}.safetensors",
                       help="the trained file (.safetensors), for `minidiff generate --lora / --embedding`")
        p.add_argument("--model", default="shapes", help="a known name or a path (default: the bundled shapes model)")
        p.add_argument("--steps", type=int, default=300, help="optimizer steps in all (default 300)")
        p.add_argument("--batch", type=int, default=16, help="pictures per step (default 16)")
        p.add_argument("--lr", type=float, help="learning rate (default 1e-3 for a LoRA, 3e-5 for a LoRA with "
                       "--token, 5e-3 for a word)")
        p.add_argument("--warmup", type=int, default=20, help="steps of linear warm-up (default 20)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default 100)")
        p.add_argument("--checkpoint", help="the checkpoint file (default OUT.checkpoint.safetensors)")
        p.add_argument("--resume", help="continue from this checkpoint, with the same settings (--steps may grow)")
        p.add_argument("--loss-curve", help="the loss curve, a PNG (default OUT.loss.png)")
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
        p.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
        p.set_defaults(run=cmd_train)


def outputs_of(args) -> tuple[Path, Path, Path]:
    """(--out, --checkpoint, --loss-curve), the last two defaulting to names beside --out."""
    out = Path(args.out)
    stem = out.with_suffix("")
    checkpoint = Path(args.checkpoint) if args.checkpoint else stem.with_name(stem.name + ".checkpoint.safetensors")
    curve = Path(args.loss_curve) if args.loss_curve else stem.with_name(stem.name + ".loss.png")
    return out, checkpoint, curve


def check_train_args(args):
    """Every option, the folder and its pictures checked before the model is loaded; returns the config."""
    from minidiff.finetune import FinetuneConfig, read_folder
    from minidiff.images import from_pil

    check_text("--model", args.model)
    check_device(args.device)
    steps = check_int("--steps", args.steps, 1, 10**7)
    check_int("--batch", args.batch, 1, 4096, "a larger batch does not fit in memory anyway")
    check_float("--lr", args.lr, 1e-8, 1.0, "e.g. 1e-3", optional=True)
    check_int("--warmup", args.warmup, 0, 10**7)
    check_seed(args.seed, "--seed")
    check_int("--save-every", args.save_every, 1, 10**7)
    word = args.method == "textual-inversion"
    if args.token is not None:
        check_text("--token", args.token)
        if not args.token or args.token != args.token.strip() or " " in args.token:
            raise InputError(f"--token must be one word without spaces, such as <my-word>, got {shown(args.token)!r}")
    elif args.vectors != 1 or args.init_word is not None:
        raise InputError(f"{'--vectors' if args.vectors != 1 else '--init-word'} shapes the new word of --token: "
                         "give --token <my-word> too (pivotal tuning), or leave it out")
    check_int("--vectors", args.vectors, 1, 16, "each vector takes one of the prompt's 77 positions")
    check_text("--init-word", args.init_word, optional=True)
    if not word:
        check_int("--rank", args.rank, 1, 1024, "LoRA ranks are small: 4 to 128")
        check_float("--alpha", args.alpha, 1e-6, 1e6, "alpha = rank is the usual choice", optional=True)
        check_float("--word-lr", args.word_lr, 1e-8, 1.0, "e.g. 5e-3")
    out, checkpoint, curve = outputs_of(args)
    for option, path, formats in (("--out", out, ADAPTER_FORMATS), ("--checkpoint", checkpoint, ADAPTER_FORMATS),
                                  ("--loss-curve", curve, CURVE_FORMATS)):
        output_format(option, path, formats)
    outputs = {"--out": [out], "--loss-curve": [curve]}
    if args.resume is not None:
        output_format("--resume", args.resume, ADAPTER_FORMATS)
        check_input_file(args.resume, "--resume")
        if args.checkpoint is None:  # a resumed run goes on writing the checkpoint it started from
            checkpoint = Path(args.resume)
    same = args.resume is not None and checkpoint.resolve() == Path(args.resume).resolve()
    check_outputs(outputs | ({} if same else {"--checkpoint": [checkpoint]}), args.overwrite)
    pictures, captions = read_folder(args.folder)
    for picture in pictures:
        from_pil(picture)  # each picture complete and within the size limits, before the model loads
    if args.token is not None and not any(args.token in caption for caption in captions):
        raise InputError(f"no caption in {shown(args.folder)} contains the new word {shown(args.token)}: write it "
                         f"where it belongs, e.g. 'a photo of {shown(args.token)}'")
    config = FinetuneConfig(method="textual_inversion" if word else "lora", steps=steps, batch=args.batch,
                            lr=args.lr, warmup=args.warmup, seed=args.seed, save_every=args.save_every,
                            token=args.token, vectors=args.vectors, init_word=args.init_word,
                            **({} if word else {"rank": args.rank, "alpha": args.alpha, "word_lr": args.word_lr}))
    return config.check(), out, checkpoint, curve


def cmd_train(args):
    """Under torchrun each process trains on its shard of every global batch; process 0 alone writes (see
    minidiff/distributed.py)."""
    import torch

    from minidiff import distributed
    from minidiff.finetune import finetune
    from minidiff.pipeline import load_pipeline

    config, out, checkpoint, curve = check_train_args(args)
    cuda = args.device in (None, "cuda") and torch.cuda.is_available() or str(args.device).startswith("cuda")
    world = distributed.setup("cuda" if cuda else "cpu")
    try:
        device = f"cuda:{world.local_rank}" if cuda and world.distributed else args.device
        pipe = load_pipeline(args.model, device=device, dtype="float32")
        log = finetune(pipe, args.folder, config, out, checkpoint=checkpoint, resume=args.resume, loss_curve=curve)
    finally:
        distributed.teardown()
    if not distributed.is_main():
        return
    use = f"--lora {shown(out)}" if config.method == "lora" else f"--embedding {shown(out)}"
    print(f"wrote {shown(out)}, {shown(curve)}, {shown(checkpoint)}: {config.steps} steps on {log['pictures']} "
          f"pictures, final loss {log['final_loss']:.4f}, {log['seconds'] / 60:.1f} min. Use it: minidiff generate "
          f"\"...\" --model {shown(args.model)} {use}")

"""`minidiff samplers | models | info MODEL | download NAME`: what there is and where it is."""

from minidiff.checks import check_text


def add_commands(sub):
    sub.add_parser("samplers", help="list the samplers").set_defaults(run=cmd_samplers)
    sub.add_parser("models", help="known models and which are present").set_defaults(run=cmd_models)
    i = sub.add_parser("info", help="architecture, parameter counts, dtype and files of a model")
    i.add_argument("model")
    i.set_defaults(run=cmd_info)
    d = sub.add_parser("download", help="download a known model into the Hugging Face cache")
    d.add_argument("name")
    d.set_defaults(run=cmd_download)


def cmd_samplers(args):
    from minidiff.samplers import SAMPLERS

    for name in sorted(SAMPLERS):
        doc = (SAMPLERS[name].__doc__ or "").strip().splitlines()
        print(f"{name:14s} {doc[0] if doc else ''}")


def cmd_models(args):
    from minidiff.hub import KNOWN_MODELS, local_path

    for name, entry in KNOWN_MODELS.items():
        where = local_path(name)
        missing = "not trained yet (python -m minidiff.course.train shapes)" if "bundled" in entry else \
            f"not downloaded (minidiff download {name})"
        status = f"present: {where}" if where else missing
        print(f"{name:16s} {entry.get('description', '')}\n{'':16s} {status}")


def cmd_info(args):
    from minidiff.hub import KNOWN_MODELS, describe_known, local_path
    from minidiff.pipeline import load_pipeline

    check_text("the model", args.model)
    if args.model in KNOWN_MODELS and "architecture" in KNOWN_MODELS[args.model] and local_path(args.model) is None:
        print(describe_known(args.model))  # not downloaded: the architecture from the config alone
        return
    pipe = load_pipeline(args.model)
    print(pipe.describe())


def cmd_download(args):
    from minidiff.hub import download

    print(download(args.name))

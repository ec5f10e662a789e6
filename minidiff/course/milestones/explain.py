"""Where a candidate differs from the reference when no known mistake matches: which term, or how the whole
output relates to the reference (a sign, a constant factor or offset, one slice, NaN).

compare (core.py) adds this as the "where:" line of a failure. A milestone whose formula is linear in some of
its inputs (add_noise, pred_x0, the DDIM and DDPM steps, Euler, guidance) passes terms=lambda: term_by_term(...):
each term is evaluated alone, the other terms' inputs set to 0, so that the message names the term whose
coefficient is off, and by how much. tol is a core.Tolerance (atol, rtol).
"""

import torch


def where_it_differs(terms, otherwise) -> str:
    """"\n  where: ..." from terms() (a term-by-term report), else from otherwise(); "" when neither says more."""
    text = ""
    if terms is not None:
        try:
            text = terms()
        except Exception:  # the explanation must never hide the mismatch itself
            text = ""
    text = text or otherwise()
    return f"\n  where: {text}" if text else ""


def relation(yours: torch.Tensor, reference: torch.Tensor, bad: torch.Tensor, tol) -> str:
    """How yours differs from the reference as a whole, when no known mistake explains it: non-finite values, one
    slice of the tensor, a sign, a constant factor or a constant offset; "" when it is none of these."""
    finite = torch.isfinite(yours)
    if not finite.all():
        return f"{int((~finite).sum())} of your {yours.numel()} values are NaN or infinite"
    if 1 < bad.numel() and int(bad.sum()) < bad.numel():
        where = bad.nonzero()
        for dim in range(bad.ndim):
            if bad.shape[dim] > 1 and bool((where[:, dim] == where[0, dim]).all()):
                return (f"only index {int(where[0, dim])} of dimension {dim} (size {bad.shape[dim]}) differs; the "
                        "rest agrees")
    if yours.numel() < 2:  # one number: any factor or offset would "explain" it
        return ""
    allowed = 2 * (tol.atol + tol.rtol * reference.abs())  # a fit that explains yours within the tolerance
    norm = float((reference * reference).sum())
    if norm > 0:
        factor = float((yours * reference).sum()) / norm
        if bool(((yours - factor * reference).abs() <= allowed).all()):
            if abs(factor + 1) < 1e-3:
                return "yours is -1 times the reference everywhere: a sign"
            return f"yours is {factor:.6g} times the reference everywhere: a constant factor is off"
    offset = float((yours - reference).mean())
    if bool(((yours - reference - offset).abs() <= allowed).all()):
        return f"yours is the reference plus {offset:.6g} everywhere: a constant is added"
    return ""


def term_by_term(yours, reference, args: tuple, terms: dict, tol, note: str = "") -> str:
    """For a formula linear in some of its arguments (terms: {position in args: name}): each term alone, the
    other terms' tensors set to 0, yours against the reference, with its coefficient when it is a multiple of
    its input. "" when the formula cannot be split so (yours fails on the zeros, shapes differ)."""
    found, differ = [], False
    zeros = [torch.zeros_like(a) if i in terms else a for i, a in enumerate(args)]
    theirs = torch.as_tensor(yours(*(a.clone() if torch.is_tensor(a) else a for a in zeros))).double()
    ours = torch.as_tensor(reference(*zeros)).double()
    if theirs.shape == ours.shape and not bool(((theirs - ours).abs() <= tol.atol + tol.rtol * ours.abs()).all()):
        return (f"with every input ({', '.join(terms.values())}) set to 0 yours gives {float(theirs.mean()):.6g} on "
                f"average, the reference {float(ours.mean()):.6g}: a term that depends on none of them is added")
    for position, name in terms.items():
        alone = [a if i == position or i not in terms else torch.zeros_like(a) for i, a in enumerate(args)]
        theirs = torch.as_tensor(yours(*(a.clone() if torch.is_tensor(a) else a for a in alone))).double()
        ours, value = torch.as_tensor(reference(*alone)).double(), args[position].double()
        if theirs.shape != ours.shape:
            return ""
        if bool(((theirs - ours).abs() <= tol.atol + tol.rtol * ours.abs()).all()):
            found.append(f"the {name} term agrees")
            continue
        differ, norm = True, float((value * value).sum())
        mine, right = float((theirs * value).sum()) / norm, float((ours * value).sum()) / norm
        if bool(((theirs - mine * value).abs() <= 2 * (tol.atol + tol.rtol * ours.abs())).all()):
            found.append(f"the {name} term differs: yours {mine:.6g} * {name}, the reference {right:.6g} * {name}")
        else:
            found.append(f"the {name} term differs (yours is not a multiple of {name} there)")
    if not differ:
        return "each term alone agrees with the reference (the other inputs set to 0): they are combined wrongly"
    return "term by term (the other inputs set to 0): " + "; ".join(found) + (f" ({note})" if note else "")


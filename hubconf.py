"""torch.hub entry points (docs/scoring.md, "torch.hub"): the A-FINE scoring model and the A-FINE loss.

    model = torch.hub.load("<this repository>", "afine")   # the released weights, downloaded on first use
    terms = model(dis, ref)                                  # RGB in [0, 1], [B, 3, H, W]; lower is better

Only functions meant as entry points are public here: torch.hub.list lists every public callable.
"""

dependencies = ["torch", "numpy", "PIL", "tqdm"]  # what scoring imports (pillow's module is PIL)


def afine(weights=None, clip=None, **kwargs):
    """A-FINE scoring model in eval mode: model(dis, ref) -> a dict of the five terms [B] (lower is better).

    weights: None for the released afine.pth (downloaded on first use to the torch hub cache), or an afine.pth or
    run folder of your own; clip: a CLIP checkpoint for weights without a fine-tuned CLIP.
    Example (repo: the GitHub "owner/name" this came from, or a clone's folder with source="local"):
        model = torch.hub.load(repo, "afine")
        with torch.no_grad():
            model(dis, ref)["afine_all_scale"]  # dis, ref: RGB in [0, 1], [B, 3, H, W], sides >= 32 px
    """
    from afine.model import load_afine

    return load_afine(weights, clip=clip, **kwargs).eval()


def afine_loss(term="afine_all", weights=None, **kwargs):
    """A-FINE as a training loss (afine.AFINELoss): criterion(output, reference) -> the term, gradients to output.

    term: afine_all (default), afine_all_scale, afine_fr or afine_nr; weights as for "afine" (None: the released
    afine.pth); other keywords (reduction, amp, checkpoint_blocks, clip) go to AFINELoss.
    Example:
        criterion = torch.hub.load(repo, "afine_loss", term="afine_all")
        loss = l1(output, gt) + 0.1 * criterion(output, gt)
    """
    from afine.afine_loss import AFINELoss

    return AFINELoss(weights, term=term, **kwargs)

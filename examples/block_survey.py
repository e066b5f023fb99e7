"""Which blocks ``prompt`` and ``side`` would attach to, for one model per timm module.

For every model module timm lists, the model with the shortest name is built on the meta
device (no memory, no weights) and its blocks are found as ``apply_s2a`` finds them: the
family table, repeated blocks, or timm's ``feature_info``. Prints one Markdown row per model
and the count per rule; docs/structure.md quotes it::

    uv run python examples/block_survey.py
"""

from __future__ import annotations

import warnings
from collections import Counter

import timm
import torch

from lightning_s2a.structure.families import find_blocks


def survey() -> list[tuple[str, str, str]]:
    """(timm module, model, rule and first..last block) per timm module."""
    rows = []
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        if not names:
            continue
        name = min(names, key=lambda n: (len(n), n))
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception as err:  # a model that cannot be built here is reported, not fatal
            rows.append((module, name, f"not built: {type(err).__name__}"))
            continue
        try:
            blocks, _, rule = find_blocks(model, None)
            rows.append((module, name, f"{rule} (`{blocks[0].name}` .. `{blocks[-1].name}`)"))
        except ValueError as err:
            rows.append((module, name, f"error: {str(err).splitlines()[0][:80]}"))
    return rows


def main() -> None:
    rows = survey()
    print("| timm module | model | blocks found |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    counts = Counter(rule.split(":")[0] for _, _, rule in rows)
    print(
        f"\n{len(rows)} models, timm {timm.__version__}: "
        + ", ".join(f"{n} {rule}" for rule, n in counts.most_common())
    )


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help only
    main()

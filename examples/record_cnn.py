"""Record a small CNN trained with AdamW on synthetic 8×8 images.

python examples/record_cnn.py runs/cnn --steps 100
"""

import argparse

import torch

import trajscope
from trajscope import zoo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "size": 8, "channels": [4, 8], "classes": 3}
    model = zoo.cnn(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(256, 1, 8, 8), torch.randint(0, 3, (256,))
    with trajscope.Recorder(
        args.run, model, opt, loss_fn, every=5, overwrite=True, model_spec="trajscope.zoo:cnn", model_kwargs=kwargs
    ) as rec:
        for step in range(args.steps):
            idx = torch.randint(0, 256, (32,))
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            rec.batch(x[idx], y[idx])
            opt.step()
    print(f"recorded to {args.run}; next: trajscope analyze {args.run}")


if __name__ == "__main__":
    main()

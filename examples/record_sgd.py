"""Record a plain SGD training loop (the contract loop of docs/spec.md §2) on synthetic data.

python examples/record_sgd.py runs/sgd --steps 200
trajscope analyze runs/sgd && tensorboard --logdir runs
"""

import argparse

import torch

import trajscope
from trajscope import zoo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder to create")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=1)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    sizes = [20, 32, 32, 4]
    model = zoo.mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_all, y_all = torch.randn(1024, 20), torch.randint(0, 4, (1024,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=64, shuffle=True)

    with trajscope.Recorder(
        args.run,
        model,
        opt,
        loss_fn,
        every=args.every,
        overwrite=True,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": sizes},
    ) as rec:
        step = 0
        while step < args.steps:
            for x, y in loader:
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                rec.batch(x, y)
                opt.step()
                step += 1
                if step >= args.steps:
                    break
    print(f"recorded {args.steps} steps to {args.run}; next: trajscope analyze {args.run}")


if __name__ == "__main__":
    main()

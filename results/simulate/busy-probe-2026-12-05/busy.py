# a training-like load: one torch thread, conv forward/backward, until killed
import torch
torch.set_num_threads(1)
m = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randn(64, 1, 28, 28); y = torch.randint(0, 10, (64,))
while True:
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()

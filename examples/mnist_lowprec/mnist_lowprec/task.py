"""mnist-lowprec: A Flower / PyTorch app."""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from quantization import BlockFloat, LowBitState, LowPrecisionOptimizer, attach_quantizers

#: 8-bit block floating point (one shared exponent per 32 values): messages and training.
FMT = BlockFloat(8, layout="block")

#: Where torchvision's MNIST lives (``<DATA_ROOT>/MNIST/raw``); downloaded there when online.
DATA_ROOT = os.environ.get("DATA_ROOT", "~/.cache/lowprec-fl/data")


class Net(nn.Module):
    """A small CNN for 28x28 grey images (80 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


@functools.cache
def _mnist(train: bool) -> datasets.MNIST:
    root = os.path.abspath(os.path.expanduser(DATA_ROOT))
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    try:
        return datasets.MNIST(root, train=train, download=True, transform=transform)
    except (RuntimeError, OSError) as err:
        raise RuntimeError(
            f"MNIST is not under DATA_ROOT={root!r} (expected {root}/MNIST/raw) and could not "
            f"be downloaded ({str(err).splitlines()[0]}): set the DATA_ROOT environment "
            "variable to a folder that holds torchvision's MNIST."
        ) from err


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """The partition's share of MNIST's training and test sets (IID: every n-th image)."""
    train, test = _mnist(train=True), _mnist(train=False)
    train_part = Subset(train, range(partition_id, len(train), num_partitions))
    test_part = Subset(test, range(partition_id, len(test), num_partitions))
    trainloader = DataLoader(train_part, batch_size=batch_size, shuffle=True)
    return trainloader, DataLoader(test_part, batch_size=256)


def train(net, trainloader, epochs, lr, device, max_steps=0):
    """Train ``net`` with SGD (``max_steps`` > 0: at most that many steps); the mean loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    optimizer = LowPrecisionOptimizer(optimizer, weight=FMT, grad=FMT, state=LowBitState.at(8))
    attach_quantizers(net, activation=FMT, error=FMT)
    net.train()
    running_loss, steps = 0.0, 0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            steps += 1
            if steps == max_steps:
                return running_loss / steps
    return running_loss / max(steps, 1)


def test(net, testloader, device):
    """Loss and accuracy of ``net`` on ``testloader``."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item() * len(labels)
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
    return loss / len(testloader.dataset), correct / len(testloader.dataset)

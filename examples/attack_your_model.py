"""Attack the gradient of a model of your own (a notebook cell): python examples/attack_your_model.py"""
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_idlg import attack

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))  # your model
digits = load_digits()
image, label = torch.tensor(digits.images[:1] / 16, dtype=torch.float32)[None], torch.tensor(digits.target[:1])
loss = nn.functional.cross_entropy(model(image), label)  # what a client computes ...
gradient = torch.autograd.grad(loss, list(model.parameters()))  # ... and shares

result = attack(model, gradient, input_shape=(1, 8, 8), method="idlg", overrides=["steps=50"])
scores = result.evaluate(image[0], label)
print(f"label {int(result.labels[0, 0])} (true {int(label)}), MSE {float(scores['mse'][0]):.2e}, {result.status[0]}")

# SAC's networks (Haarnoja et al. 2018) for the behaviour policies: the tanh-Gaussian actor that policies/<robot>/
# <domain>.pt stores, and the twin critic that trains it (behaviour.train_behaviour_policies). They import torch, so
# they stand apart from behaviour.py, which imports them only where a policy runs: data_gen.py, which imports
# behaviour.py, then loads a shifted env without torch. docs: docs/data_gen.md ("Behaviour policies")
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-Gaussian SAC actor. Only this module is saved: a few hundred KB per policy (data_gen.Actor finds it)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        # act()'s tensors, looked up once: nn.Module's attribute look-ups cost it a fifth of its time. The same objects
        # as the layers' (load_state_dict and the optimizer write into them in place), so they never go stale
        self._act_params = (self.net[0].weight, self.net[0].bias, self.net[2].weight, self.net[2].bias, self.mean.weight,
                            self.mean.bias, self.log_std.weight, self.log_std.bias)

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        h = self.net(obs)
        mean = self.mean(h)
        if deterministic:
            return torch.tanh(mean), None
        log_std = torch.tanh(self.log_std(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # CleanRL's soft clamp
        std = log_std.exp()
        pre_tanh = mean + std * torch.randn_like(mean)
        action = torch.tanh(pre_tanh)
        log_prob = (-0.5 * ((pre_tanh - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_prob = log_prob - torch.log(1 - action.pow(2) + 1e-6).sum(-1)
        return action, log_prob

    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """forward()'s action for one observation, bit for bit (the same kernels, the same noise drawn), in about half
        the time: no log-probability and no nn.Module calls. Acting is a third of a collection step, and this pays
        for most of the true dynamics gap that data_gen.py measures beside it."""
        (w1, b1, w2, b2, w_mean, b_mean, w_std, b_std), x = self._act_params, torch.as_tensor(obs, dtype=torch.float32)[None]
        h = torch.relu(F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2))
        mean = F.linear(h, w_mean, b_mean)
        if deterministic:
            return torch.tanh(mean)[0].numpy()
        log_std = torch.tanh(F.linear(h, w_std, b_std))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # as forward() computes it
        return torch.tanh(mean + log_std.exp() * torch.randn_like(mean))[0].numpy()


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        def mlp():
            return nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self.q1, self.q2 = mlp(), mlp()

    def forward(self, obs, act):
        x = torch.cat([obs, act], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

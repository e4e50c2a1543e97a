# What the default Hopper target data holds: its failed episodes, and what each discount makes of them
import minari
import numpy as np

ds = minari.load_dataset("v2a/hopper-v4/target/medium-100k-v0")
episodes = list(ds.iterate_episodes())[:-1]  # the last one is cut where the dataset is full
fell = [e for e in episodes if e.terminations[-1]]
ran = [e for e in episodes if not e.terminations[-1]]
score = lambda es: minari.get_normalized_score(ds, np.array([e.rewards.sum() for e in es])) * 100
print(f"{len(episodes)} whole episodes, mean normalized score {score(episodes).mean():.1f}")
print(f"fell: {len(fell)}, score {score(fell).mean():.1f} (range {score(fell).min():.1f}-{score(fell).max():.1f}), "
      f"mean length {np.mean([len(e.rewards) for e in fell]):.0f}")
print(f"ran 1000 steps: {len(ran)}, score {score(ran).mean():.1f} (range {score(ran).min():.1f}-{score(ran).max():.1f})")
print(f"reward per step: the 100 steps before a fall {np.concatenate([e.rewards[-100:] for e in fell]).mean():.2f}, "
      f"episodes that ran 1000 steps {np.concatenate([e.rewards for e in ran]).mean():.2f}")


def discounted_return(r, gamma):
    return float(np.sum(r * gamma ** np.arange(len(r))))


for gamma in (0.99, 0.995, 0.998, 0.999):
    v_fell, v_ran = (np.mean([discounted_return(e.rewards, gamma) for e in es]) for es in (fell, ran))
    print(f"gamma {gamma}: discounted return from the first state: fell {v_fell:.0f}, ran {v_ran:.0f} "
          f"({(v_fell / v_ran - 1) * 100:+.1f} %)")

# The dynamics-shifted domains of the source data (ODRL's families: gravity, friction, kinematic = joint range,
# morphology = limb and torso geometry), each a Gymnasium env of its own, and the robots that have them.
# docs: docs/data_gen.md ("Shifts")    method: docs/specification.md §3
# gymnasium, mujoco and numpy only: every source dataset stores ENTRY_POINT as its env's entry point, and
# `recover_environment()` of a dataset must work with those alone (docs/data_gen.md, "Using the datasets outside").
import gymnasium as gym
import mujoco
import numpy as np

from v2a_utils.errors import DataGenError

SCALE_LEVELS = ("0.1", "0.5", "2.0", "5.0")  # gravity and friction multipliers, as in ODRL
JOINT_RANGE_SCALE = {"easy": 0.8, "medium": 0.5, "hard": 0.2}  # ODRL: Hopper leg [-150,0] -> [-120|-75|-30, 0]
LIMB_LENGTH_SCALE = {"easy": 0.8, "medium": 0.6, "hard": 0.4}  # ODRL: Hopper foot capsule x0.8 ... x0.4
TORSO_SCALE = {"easy": (1.2, 1.5), "medium": (1.6, 2.0), "hard": (2.0, 2.5)}  # (length, radius): torso 0.4->0.8, r 0.05->0.125
ROBOTS = {
    # robot: kinematic joint groups, morphology parts {part: (kind, geoms)}; kinds: torso (longer and thicker,
    # growing upwards), girth (thicker only), limb (shorter)
    "Hopper": dict(joints={"legjnt": ["leg_joint"], "footjnt": ["foot_joint"]},
                   parts={"torso": ("torso", ["torso_geom"]), "foot": ("limb", ["foot_geom"])}),
    "Walker2d": dict(joints={"thighjnt": ["thigh_joint", "thigh_left_joint"], "footjnt": ["foot_joint", "foot_left_joint"]},
                     parts={"torso": ("torso", ["torso_geom"]), "foot": ("limb", ["foot_geom", "foot_left_geom"])}),
    "HalfCheetah": dict(joints={"thighjnt": ["bthigh", "fthigh"], "footjnt": ["bfoot", "ffoot"]},
                        parts={"torso": ("girth", ["torso", "head"]), "foot": ("limb", ["bfoot", "ffoot"])}),
    "Ant": dict(joints={"hipjnt": [f"hip_{i}" for i in range(1, 5)], "anklejnt": [f"ankle_{i}" for i in range(1, 5)]},
                parts={"alllegs": ("limb", ["left_ankle_geom", "right_ankle_geom", "third_ankle_geom", "fourth_ankle_geom"]),
                       "halflegs": ("limb", ["left_ankle_geom", "right_ankle_geom"])}),
}
SUPPORTED_ENV_IDS = [f"{robot}-{v}" for robot in ROBOTS for v in ("v4", "v5")]


def robot_of(env_id: str) -> str:
    robot, _, version = env_id.rpartition("-")
    if robot not in ROBOTS or version not in ("v4", "v5"):
        raise DataGenError(f"unknown env id {env_id!r}; supported: {', '.join(SUPPORTED_ENV_IDS)}")
    return robot


def domain_names(robot: str) -> list[str]:
    levels = list(JOINT_RANGE_SCALE)
    return (["nominal"] + [f"gravity-{l}" for l in SCALE_LEVELS] + [f"friction-{l}" for l in SCALE_LEVELS]
            + [f"{j}-{l}" for j in ROBOTS[robot]["joints"] for l in levels]
            + [f"{p}-{l}" for p in ROBOTS[robot]["parts"] for l in levels])


def check_domain(robot: str, domain: str) -> str:
    if domain not in domain_names(robot):
        raise DataGenError(f"unknown shift {domain!r} for {robot}; known: {', '.join(domain_names(robot))}")
    return domain


def target_env_kwargs(env_id: str) -> dict:
    # Ant-v5 appends 78 contact forces to the observation by default; drop them so that v4 and v5 match (27 dims).
    return {"include_cfrc_ext_in_observation": False} if env_id == "Ant-v5" else {}


def _scale_joint_range(lo: float, hi: float, s: float) -> tuple[float, float]:
    if lo <= 0.0 <= hi:  # shrink towards the zero posture, as ODRL does
        return lo * s, hi * s
    near, far = (lo, hi) if abs(lo) < abs(hi) else (hi, lo)  # Ant ankles ([30, 70] deg): keep the inner bound
    far = near + (far - near) * s
    return min(near, far), max(near, far)


def _scale_capsule(geom, length_scale: float, radius_scale: float, keep_bottom: bool):
    """Scale a capsule geom of an MjSpec. Limb capsules keep their centre; torso capsules keep their lower end, so
    the legs stay attached and the body grows upwards (ODRL's torso shift)."""
    if not np.isnan(geom.fromto[0]):  # fromto capsules (Ant legs, HalfCheetah torso): keep the attached end
        start, end = np.array(geom.fromto[:3]), np.array(geom.fromto[3:])
        geom.fromto = np.concatenate([start, start + (end - start) * length_scale])
    else:
        half = geom.size[1]
        geom.size[1] = half * length_scale
        if keep_bottom:
            geom.pos[2] = geom.pos[2] + half * (length_scale - 1.0)
    geom.size[0] = geom.size[0] * radius_scale


def build_shifted_model(xml_path: str, robot: str, domain: str) -> mujoco.MjModel:
    """Compile the robot's model with the dynamics shift `domain` applied."""
    family, _, level = domain.rpartition("-")
    spec = mujoco.MjSpec.from_file(xml_path)
    if family in ROBOTS[robot]["parts"]:
        kind, geoms = ROBOTS[robot]["parts"][family]
        for name in geoms:
            if kind == "torso":
                length_scale, radius_scale = TORSO_SCALE[level]
                _scale_capsule(spec.geom(name), length_scale, radius_scale, keep_bottom=True)
            elif kind == "girth":  # the legs hang from the ends of HalfCheetah's torso: change its radius only
                _scale_capsule(spec.geom(name), 1.0, TORSO_SCALE[level][1], keep_bottom=False)
            else:
                _scale_capsule(spec.geom(name), LIMB_LENGTH_SCALE[level], 1.0, keep_bottom=False)
    model = spec.compile()
    if family == "gravity":
        model.opt.gravity[:] = model.opt.gravity * float(level)
    elif family == "friction":
        model.geom_friction[:, 0] *= float(level)  # every geom, the floor included: contacts use the max of the pair
    elif family in ROBOTS[robot]["joints"]:
        for name in ROBOTS[robot]["joints"][family]:
            j = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, name)
            model.jnt_range[j] = _scale_joint_range(*model.jnt_range[j], JOINT_RANGE_SCALE[level])
    return model


# The name under which every source dataset's env spec finds its env: the script's, as datasets made before this
# package stored it, so that old and new installs of the repository rebuild old and new datasets alike (data_gen.py
# re-exports make_shifted_env).
ENTRY_POINT = "data_gen:make_shifted_env"
_SHIFTED_CLASSES: dict = {}


def make_shifted_env(base_env_id: str, shift: str, **kwargs) -> gym.Env:
    """Gymnasium entry point (ENTRY_POINT) of every shifted domain: the class of `base_env_id` with its model compiled
    by `build_shifted_model`. The kwargs live in the EnvSpec, so Minari's stored spec rebuilds exactly this domain."""
    robot = robot_of(base_env_id)
    check_domain(robot, shift)
    base_cls = gym.envs.registration.load_env_creator(gym.spec(base_env_id).entry_point)
    if base_cls not in _SHIFTED_CLASSES:
        class ShiftedEnv(base_cls):
            def __init__(self, shift: str, **kw):
                self._v2a_shift = shift  # read by _initialize_simulation inside the base __init__
                super().__init__(**kw)

            def _initialize_simulation(self):
                model = build_shifted_model(self.fullpath, robot_of(base_env_id), self._v2a_shift)
                model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
                model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
                return model, mujoco.MjData(model)

        ShiftedEnv.__name__ = f"Shifted{base_cls.__name__}"
        _SHIFTED_CLASSES[base_cls] = ShiftedEnv
    return _SHIFTED_CLASSES[base_cls](shift=shift, **{**target_env_kwargs(base_env_id), **kwargs})


for _env_id in SUPPORTED_ENV_IDS:  # guarded: gymnasium warns when an id is registered again
    _robot, _, _version = _env_id.rpartition("-")
    if f"V2A/Shifted{_robot}-{_version}" not in gym.registry:
        gym.register(f"V2A/Shifted{_robot}-{_version}", entry_point=ENTRY_POINT, max_episode_steps=1000,
                     kwargs={"base_env_id": _env_id})


def make_domain_env(env_id: str, domain: str) -> gym.Env:
    """The nominal target env for `nominal`, otherwise the registered shifted env."""
    if domain == "nominal":
        return gym.make(env_id, **target_env_kwargs(env_id))
    robot, _, version = env_id.rpartition("-")
    return gym.make(f"V2A/Shifted{robot}-{version}", shift=domain)

"""Plane geometry of synthetic views: homographies, box visibility, and easy / hard / junk labels.

Conventions: a homography is a float64 3x3 array mapping source-photo pixel coordinates
(x right, y down) to view pixel coordinates; polygons are (N, 2) float arrays of vertices
in order; boxes are (x1, y1, x2, y2); an image size is (width, height).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

EASY, HARD, JUNK = "easy", "hard", "junk"


@dataclass(frozen=True)
class LabelRule:
    """Thresholds that turn a view's `Visibility` of a query box into a revisited-Oxford label.

    easy: at least `easy_visible` of the box is visible, at a scale within a factor `easy_scale`
          of the query's, rotated by at most `easy_rotation` degrees and stretched (ratio of the
          local affine map's singular values) by at most `easy_anisotropy`;
    hard: not easy, at least `hard_visible` visible and the scale within a factor `hard_scale`;
    junk: any other view of the same scene (a sliver, or none, of the box shows, or the scale
          is extreme): ignored by every protocol rather than counted as a negative.
    """

    easy_visible: float = 0.7
    easy_scale: float = 2.0
    easy_rotation: float = 30.0
    easy_anisotropy: float = 1.5
    hard_visible: float = 0.3
    hard_scale: float = 4.0


DEFAULT_RULE = LabelRule()


@dataclass(frozen=True)
class Visibility:
    """How a query box appears in another view of its scene.

    visible: fraction of the box's area (in the other view) inside that view's frame and not occluded;
    scale: sqrt(area of the whole mapped box / area of the query box), the relative zoom;
    rotation: in-plane rotation in degrees (-180, 180] of the local affine map at the box centre;
    anisotropy: ratio >= 1 of that map's singular values (perspective / viewpoint stretch).
    """

    visible: float
    scale: float
    rotation: float
    anisotropy: float


def translate(tx: float, ty: float) -> np.ndarray:
    """3x3 homography of a translation by (tx, ty)."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scale(s: float) -> np.ndarray:
    """3x3 homography of an isotropic scaling by s about the origin."""
    return np.diag([s, s, 1.0])


def rotate(degrees: float) -> np.ndarray:
    """3x3 homography of a rotation by `degrees` about the origin (clockwise on screen, as y points down)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def apply(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through homography H; returns (N, 2) float64."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    H = np.asarray(H, dtype=np.float64)
    q = p @ H[:, :2].T + H[:, 2]
    return q[:, :2] / q[:, 2:3]


def depth(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The homogeneous w of H at (N, 2) points; all > 0 means the points stay in front (no wrap through infinity)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    H = np.asarray(H, dtype=np.float64)
    return p @ H[2, :2] + H[2, 2]


def rect(size: tuple[float, float]) -> np.ndarray:
    """(4, 2) polygon of the frame [0, w] x [0, h] of an image of size (w, h)."""
    w, h = size
    return np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])


def box_polygon(box) -> np.ndarray:
    """(4, 2) polygon of a box (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = map(float, box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])


def area(poly: np.ndarray) -> float:
    """Area of a simple polygon (N, 2); 0 for fewer than 3 vertices."""
    poly = np.asarray(poly, dtype=np.float32).reshape(-1, 2)
    return abs(float(cv2.contourArea(poly))) if len(poly) >= 3 else 0.0


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection of two convex polygons as an (M, 2) float64 polygon (M = 0 when disjoint)."""
    _, inter = cv2.intersectConvexConvex(_ccw(a), _ccw(b))
    return np.zeros((0, 2)) if inter is None else inter.reshape(-1, 2).astype(np.float64)


def _ccw(poly: np.ndarray) -> np.ndarray:
    """float32 polygon in one consistent orientation, as cv2.intersectConvexConvex expects."""
    p = np.asarray(poly, dtype=np.float32).reshape(-1, 2)
    return p[::-1].copy() if len(p) >= 3 and cv2.contourArea(p, oriented=True) < 0 else p


def covered_fraction(poly: np.ndarray, region: np.ndarray) -> float:
    """Fraction of convex `poly`'s area that lies inside convex `region`; 0 for a degenerate poly."""
    a = area(poly)
    return area(intersect(poly, region)) / a if a > 0 else 0.0


def local_affine(H: np.ndarray, point) -> np.ndarray:
    """2x2 Jacobian of the homography H at `point` (x, y)."""
    x, y = map(float, point)
    H = np.asarray(H, dtype=np.float64)
    w = H[2, 0] * x + H[2, 1] * y + H[2, 2]
    u = H[0, 0] * x + H[0, 1] * y + H[0, 2]
    v = H[1, 0] * x + H[1, 1] * y + H[1, 2]
    return np.array(
        [
            [(H[0, 0] * w - u * H[2, 0]) / w**2, (H[0, 1] * w - u * H[2, 1]) / w**2],
            [(H[1, 0] * w - v * H[2, 0]) / w**2, (H[1, 1] * w - v * H[2, 1]) / w**2],
        ]
    )


def box_visibility(
    box,
    H_query: np.ndarray,
    H_view: np.ndarray,
    view_size: tuple[float, float],
    source_size: tuple[float, float],
    occluder=None,
) -> Visibility:
    """How the query's box appears in another view of the same source photo.

    box: (x1, y1, x2, y2) in the query image; H_query, H_view: source -> query / view homographies;
    view_size, source_size: (w, h); occluder: optional (x1, y1, x2, y2) box in the view hiding content.
    The box is taken back to the source (and clipped to the photo, since only the photo's content
    can be matched), carried into the view, then clipped to the view's frame minus the occluder.
    """
    to_source = np.linalg.inv(H_query)
    in_source = intersect(apply(to_source, box_polygon(box)), rect(source_size))
    if area(in_source) == 0 or (depth(H_view, in_source) <= 0).any():
        return Visibility(0.0, 0.0, 0.0, 1.0)
    mapped = apply(H_view, in_source)
    full = area(mapped)
    shown = intersect(mapped, rect(view_size))
    hidden = intersect(shown, box_polygon(occluder)) if occluder is not None else np.zeros((0, 2))
    visible = (area(shown) - area(hidden)) / full if full > 0 else 0.0
    x1, y1, x2, y2 = map(float, box)
    relative = np.asarray(H_view, dtype=np.float64) @ to_source
    J = local_affine(relative, ((x1 + x2) / 2, (y1 + y2) / 2))
    U, s, Vt = np.linalg.svd(J)
    R = U @ Vt
    rotation = float(np.degrees(np.arctan2(R[1, 0], R[0, 0])))
    return Visibility(
        visible=float(np.clip(visible, 0.0, 1.0)),
        scale=float(np.sqrt(full / max((x2 - x1) * (y2 - y1), 1e-12))),
        rotation=rotation,
        anisotropy=float(s[0] / max(s[1], 1e-12)),
    )


def label(v: Visibility, rule: LabelRule = DEFAULT_RULE) -> str:
    """'easy', 'hard' or 'junk' for a view of the query's own scene (see `LabelRule`)."""
    log_scale = abs(np.log(v.scale)) if v.scale > 0 else np.inf
    if (
        v.visible >= rule.easy_visible
        and log_scale <= np.log(rule.easy_scale)
        and abs(v.rotation) <= rule.easy_rotation
        and v.anisotropy <= rule.easy_anisotropy
    ):
        return EASY
    if v.visible >= rule.hard_visible and log_scale <= np.log(rule.hard_scale):
        return HARD
    return JUNK

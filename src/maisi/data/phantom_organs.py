"""Phantom anatomy in atlas mm (RAS+, z = 0 at the top of L5): tissues and organs painted onto a Canvas."""

from __future__ import annotations

import numpy as np

from maisi.data.shapes import Canvas, Selection, chaikin, rotation

# Tissue classes: (mean HU, texture amplitude HU). Labels say what an organ is; tissues say how it looks.
TISSUES: dict[str, tuple[float, float]] = {
    "air_out": (-1000.0, 0.0), "skin": (30.0, 8.0), "fat": (-100.0, 12.0), "muscle": (48.0, 10.0),
    "visceral": (-85.0, 25.0), "lung": (-855.0, 35.0), "air": (-995.0, 4.0), "liver": (98.0, 10.0),
    "spleen": (108.0, 10.0), "kidney": (165.0, 22.0), "pancreas": (88.0, 14.0), "fluid": (18.0, 6.0),
    "bowel": (38.0, 30.0), "artery": (185.0, 8.0), "vein": (135.0, 8.0), "myocardium": (60.0, 8.0),
    "brain": (38.0, 4.0), "white_matter": (27.0, 3.0), "csf": (8.0, 3.0), "cortical": (880.0, 70.0), "cancellous": (270.0, 55.0),
    "bone": (520.0, 80.0), "marrow": (45.0, 25.0), "cartilage": (125.0, 12.0), "soft": (40.0, 10.0),
    "tumor_liver": (38.0, 14.0), "tumor_pancreas": (42.0, 12.0), "tumor_lung": (35.0, 14.0),
    "lesion": (95.0, 25.0), "thyroid": (115.0, 10.0), "feces": (-250.0, 180.0), "vessel": (70.0, 15.0),
}
T = {name: i for i, name in enumerate(TISSUES)}
VERTEBRAE = [(33 + k, 32.0) for k in range(5)] + [(38 + k, 24.0) for k in range(12)] + [(50 + k, 17.0) for k in range(7)]
LUNG_IDS = (28, 29, 30, 31, 32)
BONE_IDS = tuple(range(33, 57)) + tuple(range(63, 87)) + (87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 120, 122, 127)


class Anatomy:
    """One randomised patient. World coordinates are atlas mm: x → patient left is −x (RAS: +x = right),
    y → anterior, z → superior with 0 at the top of L5. Organs are drawn in the order of `draw`."""

    def __init__(self, rng: np.random.Generator, scale: dict[int, float] | None = None):
        self.rng = rng
        self.scale = dict(scale or {})  # label id -> factor on the organ's radii (make_phantom's organ_scale)
        u = rng.uniform
        self.wx, self.wy = u(0.9, 1.08), u(0.9, 1.1)  # body width / depth scale
        self.fat = u(10.0, 26.0)  # subcutaneous fat thickness, mm
        self.wall = u(8.0, 13.0)  # muscle wall thickness, mm
        self.dome = (u(270.0, 285.0), u(258.0, 272.0))  # right / left diaphragm dome heights

    # -- helpers ---------------------------------------------------------------------------------
    def j(self, v, s: float = 4.0) -> np.ndarray:
        """Jitter a point (mm) by N(0, s)."""
        v = np.asarray(v, dtype=np.float64)
        return v + self.rng.normal(0.0, s, v.shape)

    def sc(self, r, lo: float = 0.9, hi: float = 1.1) -> np.ndarray:
        return np.asarray(r, dtype=np.float64) * self.rng.uniform(lo, hi)

    def grow(self, label: int, r, clip=None):
        """Radii `r` times the organ's scale factor, and the clip that keeps a scaled organ inside the trunk's
        muscle wall (x, y, z -> bool, or None). Organs without a factor keep their radii and clip exactly."""
        if label not in self.scale:
            return r, clip
        inner = lambda x, y, z: self.inside_trunk(x, y, z, shrink=2.0 + self.fat + self.wall)  # noqa: E731
        both = inner if clip is None else (lambda x, y, z: clip(x, y, z) & inner(x, y, z))
        return np.asarray(r, dtype=np.float64) * self.scale[label], both

    def axes(self, z):
        """Trunk/neck cross-section semi-axes (ax, ay) and centre y at height z."""
        zs = [-175, -100, -20, 60, 140, 220, 300, 380, 430, 455, 478, 500, 560]
        ax = [172, 176, 170, 160, 156, 160, 166, 168, 160, 138, 72, 58, 60]
        ay = [112, 114, 110, 108, 110, 116, 120, 116, 106, 90, 62, 58, 60]
        return np.interp(z, zs, ax) * self.wx, np.interp(z, zs, ay) * self.wy, np.zeros_like(z, dtype=float)

    def spine_y(self, z):
        return np.interp(z, [-30, 0, 160, 300, 448, 567], [-42, -40, -38, -58, -45, -12]) * self.wy

    def diaphragm(self, x, y):
        """Height of the diaphragm surface: two domes (right higher)."""
        r = self.dome[0] - 0.0055 * (x - 60) ** 2 - 0.0045 * y ** 2
        left = self.dome[1] - 0.0055 * (x + 60) ** 2 - 0.0045 * y ** 2
        return np.maximum(r, left)

    def inside_trunk(self, x, y, z, shrink: float = 0.0):
        """Inside the trunk cross-section shrunk by `shrink` mm (−175 ≤ z ≤ 560)."""
        ax, ay, yc = self.axes(z)
        q = (x / np.maximum(ax - shrink, 1)) ** 2 + ((y - yc) / np.maximum(ay - shrink, 1)) ** 2
        return (q < 1) & (z >= -175) & (z <= 560)

    # -- drawing ------------------------------------------------------------------------------------
    def draw(self, c: Canvas) -> None:
        self.body(c)
        self.muscles(c)
        self.abdomen(c)
        self.chest(c)
        self.vessels(c)
        self.spine(c)
        self.ribcage(c)
        self.pelvis(c)
        self.head(c)

    def body(self, c: Canvas) -> None:
        """Skin, subcutaneous fat, muscle wall and interior, as depth bands below the body surface."""
        x, y, z = (c.axes[a].astype(np.float32).reshape([-1 if k == a else 1 for k in range(3)]) for a in range(3))
        depth = np.full(c.shape, -1.0, np.float32)
        k0, k1, k2 = np.searchsorted(c.axes[2], [-175.0, 560.0, 490.0], side="right")
        for sl, part in ((slice(0, k0), "legs"), (slice(k0, k1), "trunk")):  # z slabs, each shape only where it is
            if sl.stop > sl.start:
                depth[..., sl] = self.trunk_depth(x, y, z[..., sl], c.deform[..., sl], part)
        if k2 < c.shape[2]:
            depth[..., k2:] = np.maximum(depth[..., k2:], self.head_depth(x, y, z[..., k2:]))
        fat = 2.0 + self.fat * np.where(z > 470, 0.3, 1.0).astype(np.float32)
        interior = np.where(z > 465, T["muscle"], T["visceral"]).astype(np.uint8)
        tissue = np.where(depth > fat + self.wall, interior, np.uint8(T["muscle"]))
        tissue = np.where(depth > fat, tissue, np.uint8(T["fat"]))
        tissue = np.where(depth > 2.0, tissue, np.uint8(T["skin"]))
        inside = depth > 0
        c.tissue[...] = np.where(inside, tissue, np.uint8(0))
        c.label[inside] = 200

    def trunk_depth(self, x, y, z, deform, part: str):
        """Approximate depth (mm) below the surface of the trunk/neck (−175 ≤ z ≤ 560) or the legs (z < −175)."""
        if part == "trunk":
            ax, ay, yc = self.axes(z)
            return _ellipse_depth([x, y - yc], [ax, ay], 0.02 * deform)
        lx = 80 * self.wx - 0.06 * (-175 - z)
        ly = 78 * self.wy - 0.05 * (-175 - z)
        return _ellipse_depth([np.abs(x) - 95, y], [lx, ly], 0.02 * deform)

    def head_depth(self, x, y, z):
        head = _ellipse_depth([x, y - 10, z - 630], [76 * self.wx, 96 * self.wy, 100])
        face = _ellipse_depth([x, y - 45, z - 558], [56 * self.wx, 60 * self.wy, 62])
        return np.maximum(head, face)

    def vessel_tree(self, c: Canvas, roots, radius: float, length: float, depth: int, within, label, tissue) -> None:
        """Branching vessels from (start, direction) roots: each segment splits in two, 0.75× as long, 0.7× as thick."""
        todo = [(np.asarray(p0, float), d / np.linalg.norm(d), radius, length, depth) for p0, d in roots]
        while todo:
            p0, d, r, n, k = todo.pop()
            bend = self.rng.normal(0, 0.25, 3)
            p1 = p0 + n * 0.5 * d
            p2 = p1 + n * 0.5 * (d + bend) / np.linalg.norm(d + bend)
            c.paint(c.tube([p0, p1, p2], [r, 0.9 * r, 0.8 * r]), label, T[tissue], within=within)
            if k > 0:
                d2 = (p2 - p1) / np.linalg.norm(p2 - p1)
                for _ in range(2):
                    child = d2 + self.rng.normal(0, 0.45, 3)
                    todo.append((p2, child / np.linalg.norm(child), 0.7 * r, 0.75 * n, k - 1))

    def muscles(self, c: Canvas) -> None:
        for side, lab_auto, lab_psoas, lab_glut in ((-1, 104, 106, 98), (1, 105, 107, 99)):
            zs = np.linspace(-20, 520, 12)
            pts = [(side * 32 * self.wx, self.spine_y(z) - 42, z) for z in zs]
            c.paint(c.tube(chaikin(pts), np.interp(zs, [0, 300, 520], [24, 18, 12])), lab_auto, T["muscle"])
            pts = self.j([(side * 28, -45, 160), (side * 45, -25, 40), (side * 62, 10, -50), (side * 75, 25, -110)])
            c.paint(c.tube(chaikin(pts), [9, 17, 22, 18]), lab_psoas, T["muscle"])
            g = c.ellipsoid(self.j((side * 80 * self.wx, -80 * self.wy, -95)), self.sc((60, 38, 75)),
                            rot=rotation("z", side * 20))
            c.paint(g, lab_glut, T["muscle"])

    def abdomen(self, c: Canvas) -> None:
        below = lambda x, y, z: z < self.diaphragm(x, y) - 1.0  # noqa: E731
        c.paint(c.ellipsoid(self.j((10, 30, 60), 6), self.sc((75, 50, 70)), deform=0.3), 19, T["bowel"],
                within=(200,))
        colon = self.j([(85, 0, 40), (88, 10, 140), (72, 35, 168), (0, 72, 150), (-78, 15, 205), (-92, -10, 130),
                        (-88, 0, 20), (-50, 45, -40), (0, 30, -65), (0, -62, -100), (0, -68, -160)], 5)
        r, clip = self.grow(62, np.interp(np.arange(len(colon)), [0, 4, 8, 10], [24, 20, 15, 17]))
        c.paint(c.tube(chaikin(colon), r, clip=clip), 62, T["bowel"], within=(200, 19))
        c.paint(c.tube(chaikin(colon), r - 6, clip=clip), 62, T["feces"], within=(62,))
        liver = []
        for centre, radii in (((62, 2, 200), (88, 92, 78)), ((-12, 48, 228), (58, 38, 34))):
            at = self.j(centre)
            r, clip = self.grow(1, self.sc(radii), below)
            liver.append(c.ellipsoid(at, r, clip=clip))
        for sel in liver:
            c.paint(sel, 1, T["liver"], within=(200, 19, 62))
        porta = self.j((38, 8, 190), 3)
        roots = [(porta, np.array(d)) for d in ((1.0, 0.2, 0.5), (0.8, -0.6, 0.2), (0.5, 0.2, -0.8), (-1.0, 0.8, 0.6))]
        self.vessel_tree(c, roots, 5.0, 35.0, 2, (1,), 25, "vein")
        at = self.j((52, 60, 168))  # each centre is drawn before its radii: the default phantoms stay as they were
        r, clip = self.grow(10, self.sc((15, 15, 32)))
        c.paint(c.ellipsoid(at, r, rot=rotation("x", 30), clip=clip), 10, T["fluid"])
        at = self.j((-55, 35, 210))
        r, clip = self.grow(12, self.sc((46, 34, 56)), below)
        stomach = c.ellipsoid(at, r, rot=rotation("y", -20), clip=clip)
        c.paint(stomach, 12, T["fluid"], within=(200, 19, 62))
        if stomach is not None:
            zc = c.axes[2][stomach.slices[2]].reshape(1, 1, -1)
            gas = Selection(stomach.slices, stomach.mask & (zc > 228 + self.rng.uniform(-8, 8)))
            c.paint(gas, 12, T["air"], within=(12,))
        at = self.j((-92, -45, 212))
        r, clip = self.grow(3, self.sc((30, 52, 56)), below)
        c.paint(c.ellipsoid(at, r, rot=rotation("z", 35), clip=clip), 3, T["spleen"])
        pan = self.j([(32, 2, 158), (8, 12, 166), (-40, 0, 178), (-82, -28, 190)], 3)
        r, clip = self.grow(4, self.sc([17, 12, 11, 9]))
        c.paint(c.tube(chaikin(pan), r, clip=clip), 4, T["pancreas"], within=(200, 19, 62))
        for lab, side, zc in ((5, 1, 128), (14, -1, 146)):
            at = self.j((side * 70, -52, zc))
            r, clip = self.grow(lab, self.sc((28, 25, 56)))
            k = c.ellipsoid(at, r, rot=rotation("z", side * 25), clip=clip)
            c.paint(k, lab, T["kidney"])
            c.paint(c.ellipsoid(self.j((side * 58, -44, zc), 2), (9, 9, 22)), lab, T["fat"], within=(lab,))
        at = self.j((0, 48, -92))
        r, clip = self.grow(15, self.sc((46, 36, 38)))
        c.paint(c.ellipsoid(at, r, deform=0.08, clip=clip), 15, T["fluid"])
        c.paint(c.ellipsoid(self.j((0, 38, -140), 2), self.sc((20, 17, 18))), 118, T["soft"])

    def chest(self, c: Canvas) -> None:
        cav = self.fat + self.wall + 14.0

        def lung_clip(x, y, z):
            return (z > self.diaphragm(x, y) + 2) & self.inside_trunk(x, y, z, cav) & (np.abs(x) > 14)

        for side, ids in ((1, (30, 31, 32)), (-1, (28, 28, 29))):
            sel = c.ellipsoid(self.j((side * 78, -8, 330)), self.sc((80, 110, 136), 0.95, 1.05), clip=lung_clip)
            if sel is None:
                continue
            y = c.axes[1][sel.slices[1]].reshape(1, -1, 1)
            z = c.axes[2][sel.slices[2]].reshape(1, 1, -1)
            fissure = 322 - 0.83 * y + 6 * c.deform[sel.slices]
            upper = z > fissure
            lab = np.where(upper, np.where(z > 326, ids[0], ids[1]), ids[2]).astype(np.uint8)
            for value in set(ids):
                c.paint(Selection(sel.slices, sel.mask & (lab == value)), value, T["lung"])
        for side in (-1, 1):  # pulmonary vessels, labelled as their lobe
            roots = [(0.3, 0.0, 1.0), (1.0, 0.1, 0.1), (0.4, -0.3, -1.0), (0.6, 1.0, -0.3), (0.6, -1.0, 0.0)]
            hilum = self.j((side * 45, -5, 325), 3)
            self.vessel_tree(c, [(hilum, np.array((side * a, b, z))) for a, b, z in roots], 5.5, 45.0, 3,
                             LUNG_IDS, None, "vessel")
        heart = c.ellipsoid(self.j((-22, 32, 302)), self.sc((64, 50, 58)), rot=rotation("z", -35),
                            clip=lambda x, y, z: z > self.diaphragm(x, y) - 4)
        c.paint(heart, 115, T["myocardium"])
        c.paint(c.ellipsoid(self.j((-22, 30, 304), 2), self.sc((50, 36, 46)), rot=rotation("z", -35)),
                115, T["artery"], within=(115,))
        c.paint(c.tube(chaikin([(8, 0, 515), (4, 22, 480), (3, 10, 440), (0, -10, 372)]), 8), 200, T["soft"])
        c.paint(c.tube(chaikin([(0, -10, 372), (30, -20, 352), (58, -22, 330), (72, -30, 300)]), 6.5),
                200, T["soft"])
        c.paint(c.tube(chaikin([(0, -10, 372), (-35, -20, 350), (-62, -25, 325), (-78, -35, 300)]), 6.5),
                200, T["soft"])
        airway = [([(8, 0, 515), (4, 22, 480), (3, 10, 440), (0, -10, 372)], 6.5),
                  ([(0, -10, 372), (30, -20, 352), (58, -22, 330), (72, -30, 300)], 4.5),
                  ([(0, -10, 372), (-35, -20, 350), (-62, -25, 325), (-78, -35, 300)], 4.5)]
        for pts, r in airway:
            c.paint(c.tube(chaikin(pts), r), 132, T["air"])
        eso = [(-2, -22, 520), (-4, -32, 420), (-14, -36, 320), (-32, 5, 262), (-45, 20, 245)]
        c.paint(c.tube(chaikin(eso), 7), 11, T["soft"])
        for side in (-1, 1):
            c.paint(c.ellipsoid(self.j((side * 20, 18, 468), 2), (9, 10, 20)), 126, T["thyroid"])

    def vessels(self, c: Canvas) -> None:
        ys = self.spine_y
        aorta = [(-5, 22, 300), (6, 30, 350), (-4, 8, 395), (-24, -30, 385), (-24, ys(320) + 22, 320),
                 (-16, ys(200) + 26, 200), (-10, ys(100) + 28, 100), (-6, ys(30) + 30, 28)]
        c.paint(c.tube(chaikin(aorta), [15, 15, 13, 12, 12, 11, 10, 9]), 6, T["artery"])
        for lab, side in ((58, -1), (59, 1)):
            pts = [(-6, ys(30) + 30, 28), (side * 40, ys(-20) + 38, -25), (side * 70, 10, -85), (side * 85, 18, -130)]
            c.paint(c.tube(chaikin(pts), [7, 6.5, 6, 6]), lab, T["artery"])
        ivc = [(24, ys(30) + 28, 20), (24, ys(120) + 28, 150), (30, -8, 232), (16, 12, 272)]
        c.paint(c.tube(chaikin(ivc), 11), 7, T["vein"])
        for lab, side in ((112, -1), (113, 1)):
            pts = [(side * 8, 10, 392), (side * 24, 6, 450), (side * 30, 0, 520), (side * 32, 0, 560)]
            c.paint(c.tube(chaikin(pts), 4.0), lab, T["artery"])

    def spine(self, c: Canvas) -> None:
        z = 0.0
        levels = [(127, 30.0, -30.0)]
        for lab, h in VERTEBRAE:
            levels.append((lab, h, z))
            z += h
        self.level_z = {}
        for lab, h, z0 in levels:
            zc = z0 + h / 2
            self.level_z[lab] = zc
            ys = self.spine_y(zc)
            rx = float(np.interp(zc, [0, 160, 300, 448, 567], [24, 22, 17, 14, 11])) * self.wx
            ry = 0.78 * rx
            half = 0.5 * h * 0.82
            body = c.ellipsoid((0, ys, zc), (rx, ry, half), deform=0.04, zpow=8)
            c.paint(body, lab, T["cortical"])
            c.paint(c.ellipsoid((0, ys, zc), (rx - 2.5, ry - 2.5, half - 2.0), deform=0.0, zpow=8), lab, T["cancellous"],
                    within=(lab,))
            yb = ys - ry
            t = 4.0 if zc < 448 else 3.0
            for s in (-1, 1):
                arch = [(s * rx * 0.55, yb + 3, zc), (s * (rx * 0.5 + 3), yb - 14, zc), (s * 6, yb - 24, zc - 2),
                        (0, yb - 26, zc - 3)]
                c.paint(c.tube(arch, t), lab, T["bone"])
                span = 28.0 if zc < 160 else 20.0
                c.paint(c.tube([(s * rx * 0.5, yb - 12, zc), (s * (rx + span), yb - 16, zc + 2)], t), lab, T["bone"])
            spin = 30.0 if zc < 448 else 18.0
            drop = 0.35 * h if 160 < zc < 448 else 0.15 * h
            c.paint(c.tube([(0, yb - 24, zc - 2), (0, yb - 24 - spin, zc - 2 - drop)], [t + 2.5, t + 1]), lab, T["bone"])
        cord = [(0, self.spine_y(z) - 0.78 * float(np.interp(z, [0, 160, 300, 448, 567], [24, 22, 17, 14, 11]))
                 * self.wx - 12, z) for z in np.linspace(20, 575, 16)]
        c.paint(c.tube(cord, 6.0), 121, T["soft"])
        sacrum = c.ellipsoid(self.j((0, self.spine_y(-30) - 25, -78), 2), self.sc((40, 13, 50)),
                             rot=rotation("x", -30), deform=0.05)
        c.paint(sacrum, 97, T["bone"])

    def ribcage(self, c: Canvas) -> None:
        scale = [0.8, 0.9, 0.96, 0.99, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.99, 0.97]
        end = [None] * 7 + [2.5, 2.3, 2.1, 1.5, 1.15]
        for k in range(12):
            zk = self.level_z[49 - k] + 4
            ax, ay, yc = self.axes(zk)
            a, b = (ax - self.fat - 10) * scale[k], (ay - self.fat - 10) * min(1.0, scale[k] + 0.05)
            t1 = end[k] or np.pi - np.arcsin(min(1.0, 20.0 / a))
            th = np.linspace(0.3, t1, 28)
            u = (th - th[0]) / (th[-1] - th[0])
            drop = 60 + 4 * k
            r = 6.0 if k < 2 else 4.0 if k > 9 else 5.0
            for side, first in ((-1, 63), (1, 75)):
                ys = self.spine_y(zk)
                pts = np.column_stack([side * a * np.sin(th), yc - b * np.cos(th), zk - drop * u ** 0.9])
                pts = np.vstack([[side * 14 * self.wx, ys - 6, zk + 2], pts])
                cut = len(pts) if k >= 10 else int(0.8 * len(pts))
                c.paint(c.tube(pts[:cut], r), first + k, T["bone"])
                if cut < len(pts):
                    c.paint(c.tube(pts[cut - 1:], r - 0.5), 114, T["cartilage"])
        front = lambda z: self.axes(z)[1] - self.fat - self.wall - 4  # noqa: E731
        zs = np.linspace(298, 452, 8)
        c.paint(c.tube([(0, front(z), z) for z in zs], np.interp(zs, [298, 420, 452], [8, 9, 12])), 122, T["bone"])
        for lab, side in ((91, -1), (92, 1)):
            c.paint(c.tube(chaikin([(side * 14, front(452), 452), (side * 70, front(452) - 12, 462),
                                    (side * 140, 5, 472)]), 7), lab, T["bone"])
        for lab, side in ((89, -1), (90, 1)):
            back = -self.axes(390)[1] + self.fat + self.wall + 10
            sel = c.ellipsoid(self.j((side * 92, back, 385), 3), (48, 5, 68), rot=rotation("z", -side * 25),
                              deform=0.05)
            c.paint(sel, lab, T["bone"])

    def pelvis(self, c: Canvas) -> None:
        for hip, femur, s in ((95, 93, -1), (96, 94, 1)):
            head = np.array((s * 92, 2, -82)) + self.rng.normal(0, 2, 3)
            wing = c.ellipsoid((s * 88, -12, 18), self.sc((68, 7, 48)), rot=rotation("z", -s * 50), deform=0.05)
            c.paint(wing, hip, T["bone"])
            ring = [(s * 42, self.spine_y(0) - 12, 5), (s * 92, -24, -40), head + (s * 4, 0, 8),
                    (s * 55, 45, -105), (s * 8, 58, -112)]
            c.paint(c.tube(chaikin(ring), 11), hip, T["bone"])
            isch = [head + (s * 2, -6, -10), (s * 62, -28, -128), (s * 38, 30, -128), (s * 8, 58, -112)]
            c.paint(c.tube(chaikin(isch), 9), hip, T["bone"])
            c.paint(c.ellipsoid(head, (24, 24, 24), deform=0.02), femur, T["cancellous"])
            c.paint(c.ellipsoid(head, (21, 21, 21), deform=0.0), femur, T["cancellous"], within=(femur,))
            neck = [head, head + (s * 26, -6, -28)]
            c.paint(c.tube(neck, 15), femur, T["cancellous"])
            c.paint(c.ellipsoid(head + (s * 34, -10, -24), (18, 18, 22)), femur, T["cancellous"])
            shaft = [head + (s * 26, -6, -28), (s * 112, 8, -300), (s * 92, 4, -470)]
            c.paint(c.tube(chaikin(shaft), 14), femur, T["cortical"])
            c.paint(c.tube(chaikin(shaft)[1:], 8), femur, T["marrow"], within=(femur,))

    def head(self, c: Canvas) -> None:
        ctr, rad = self.j((0, 10 * self.wy, 632), 2), np.array((70 * self.wx, 90 * self.wy, 92))

        def base(y):  # skull base: anterior cranial fossa high, posterior fossa low
            return ctr[2] - 62 + 0.35 * (y - ctr[1])

        skull = c.ellipsoid(ctr, rad, deform=0.02, clip=lambda x, y, z: z > base(y) - 4)
        c.paint(skull, 120, T["cortical"])
        c.paint(c.ellipsoid(ctr, rad - 3, deform=0.0, clip=lambda x, y, z: z > base(y) - 1), 120, T["cancellous"],
                within=(120,))
        inner = c.ellipsoid(ctr, rad - 7, deform=0.0, clip=lambda x, y, z: z > base(y) + 3)
        c.paint(inner, 22, T["brain"])
        c.paint(c.ellipsoid(ctr + (0, 0, 8), rad * (0.72, 0.74, 0.6), deform=0.35), 22, T["white_matter"],
                within=(22,))
        for s in (-1, 1):
            c.paint(c.ellipsoid(ctr + (s * 9, 5, 12), (6, 28, 10), deform=0.05), 22, T["csf"], within=(22,))
            c.paint(c.ellipsoid((s * 30 * self.wx, 82 * self.wy, 584), (11, 11, 11), deform=0.0), 200, T["fluid"],
                    within=(200,))
            c.paint(c.ellipsoid((s * 27, 62 * self.wy, 552), (13, 17, 16)), 200, T["air"], within=(200,))
        mand = [(-50, -2, 568), (-48, 8, 505), (-28, 62, 495), (0, 86 * self.wy, 494), (28, 62, 495), (48, 8, 505),
                (50, -2, 568)]
        c.paint(c.tube(chaikin(mand), 6), 120, T["bone"])
        c.paint(c.ellipsoid((0, 76 * self.wy, 560), (6, 16, 20)), 200, T["air"], within=(200,))


def _ellipse_depth(offsets, radii, slack=0.0) -> np.ndarray:
    """Approximate signed depth (mm, > 0 inside) below an ellipse/ellipsoid surface: (1 + slack − q)/|∇q|,
    q = sqrt(Σ (d/r)²). Exact on the surface, close within a few centimetres of it."""
    q = np.sqrt(sum((d / r) ** 2 for d, r in zip(offsets, radii)))
    g = np.sqrt(sum((d / (r * r)) ** 2 for d, r in zip(offsets, radii)))
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = (1.0 + slack - q) * q / g
    return np.where(q > 1e-6, depth, np.float32(1e4)).astype(np.float32)

"""dlib's ResNet-128 identity figures (avat3r_core.identity) and CSIM on images (avat3r_core.metrics.csim),
on real photographs: scikit-image's astronaut and matplotlib's Grace Hopper (public domain)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avat3r_core.identity import FaceIdentity, cosine, similarities
from avat3r_core.metrics import csim
from tests.test_pictures import _astronaut, _hopper


@pytest.fixture(scope="module")
def photos():
    from avat3r_core.reconstruct.pictures import read_picture

    return {"astronaut": read_picture(_astronaut())[0], "hopper": read_picture(_hopper())[0]}


@pytest.fixture(scope="module")
def identity():
    ident = FaceIdentity()
    assert ident.available, ident.reason  # make setup installs dlib-bin and the model files
    return ident


def test_same_picture_is_similarity_one_and_another_person_lower(identity, photos):
    a, h = identity.embed(photos["astronaut"]), identity.embed(photos["hopper"])
    assert a.shape == (128,) and h.shape == (128,)
    same = identity.compare(a, photos["astronaut"])
    assert same == {"similarity": 1.0, "distance": 0.0, "face_found": True}
    other = identity.compare(a, photos["hopper"])
    assert other["similarity"] < 0.95 and other["distance"] > 0.6  # dlib's rule: > 0.6 is someone else
    # the same person in a mirror image stays the same person (dlib's rule: < 0.6)
    assert identity.compare(a, photos["astronaut"][:, ::-1])["distance"] < 0.4
    assert identity.embed(np.full((200, 200, 3), 128, np.uint8)) is None  # no face: no embedding


def test_similarities_are_nan_where_a_side_has_no_face():
    e = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    sim, dist = similarities([e[0], e[0], None], [e[0], e[1], e[1]])
    assert sim[0] == pytest.approx(1.0) and sim[1] == pytest.approx(0.0) and math.isnan(sim[2])
    assert dist[1] == pytest.approx(math.sqrt(5)) and math.isnan(dist[2])
    assert cosine(e[0], 3 * e[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        similarities([e[0]], [])


def test_csim_on_image_tensors(identity, photos):
    import cv2

    def t(img):
        return torch.from_numpy(cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)).permute(2, 0, 1).float() / 255

    a, h = t(photos["astronaut"]), t(photos["hopper"])
    blank = torch.full_like(a, 0.5)
    out = csim(torch.stack([a, h, blank]), torch.stack([a, a, a]), identity=identity)
    assert out[0].item() == pytest.approx(1.0, abs=1e-6)
    assert out[1].item() < out[0].item() - 0.05
    assert math.isnan(out[2].item())  # no face on the "render": no CSIM for that view
    # a small crop (the studio's evaluation views) needs enlarging before dlib's HOG detector finds it
    small = torch.nn.functional.interpolate(a[None], size=(64, 64), mode="area")
    assert math.isnan(csim(small, small, identity=identity)[0].item())
    assert csim(small, small, identity=identity, upscale=4)[0].item() == pytest.approx(1.0, abs=1e-6)

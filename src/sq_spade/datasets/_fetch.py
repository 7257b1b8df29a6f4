"""Pooch registries of the public data sq_spade uses, pinned to commit and sha256.

The data folder is ``SQ_SPADE_DATA_DIR`` (``sq_spade.settings.data_dir``), laid out as
``<repository>/<path in repository>``; when unset, pooch's own cache is used. Files already
there with the right hash are never downloaded again, so a copy of the data made elsewhere
(for example ``../shared/data``) serves offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sq_spade._settings import settings


@dataclass(frozen=True)
class Origin:
    """A public repository pinned at a commit."""

    folder: str
    repo: str
    commit: str

    @property
    def base_url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/"


HER2ST = Origin("her2st", "almaan/her2st", "85df7411b987a7dec3feff9718b869a7a82091ec")
HISTOGENE = Origin("histogene", "maxpmx/HisToGene", "44ff75b9b68949796f27f1b4121d36ea4cba8bf3")
STUTILITY = Origin("stutility", "jbergenstrahle/STUtility", "9a8f421499e58b13340ee386db07b0eba923c88c")
GIOTTO = Origin("giottodata", "drieslab/GiottoData", "1dc55ee8195104a81549b9e3fad04bd459b226de")
SCANPY = Origin("scanpy", "scverse/scanpy", "fabadb9412c0d1cd9df9d9c2e95ac266d564ee18")

REGISTRY: dict[Origin, dict[str, str]] = {
    HER2ST: {
        "app/www/imgs/A1_HE_image_dark.png": "e3836547df4772907bb537e53f41794fe4e603e9a6c99c1f6e91ef4342b95a6d",
        "app/www/imgs/A2_HE_image_dark.png": "f37416252956df8f2ff088b4213f37e23d0522c05ef0943eeaede2be50675a73",
        "data/ST-cnts/A1.tsv.gz": "d91035e5d8a9c4ce7865e4c61446deec1a7318602d41b3220e9fcb3ce7e41fe3",
        "data/ST-cnts/A2.tsv.gz": "1c84f44bfc0bce6d5647b78e4598e2456f769e29f72ca52911d5bc4be81e410c",
        "data/ST-cnts/B4.tsv.gz": "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
        "data/ST-cnts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
        "data/ST-cnts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
        "data/ST-cnts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
        "data/ST-imgs/B/B4/BT10737_D2_HE.jpg": "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
        "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
        "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
        "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
        "data/ST-pat/lbl/A1_labeled_coordinates.tsv": "23a0a68dccd54a8397ea4066994edb7110e88373d5b3bc6e35254dda9253fa5f",
        "data/ST-spotfiles/A1_selection.tsv": "e5f79223be2ea2aebb082c4759059ab7079b0132052d0944209048ac57788c5d",
        "data/ST-spotfiles/A2_selection.tsv": "b21f48c8492ff1d71c0d0d396dbde64735ff8fa5419bcc6f5cffe60f68d7cb09",
        "data/ST-spotfiles/B4_selection.tsv": "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
        "data/ST-spotfiles/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
        "data/ST-spotfiles/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
        "data/ST-spotfiles/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    },
    HISTOGENE: {
        "data/her_hvg_cut_1000.npy": "c3492478d462c72796a2f9603302af8e0b34cb884cd55cbd864c193001c9402b",
    },
    STUTILITY: {
        "inst/extdata/counts/MOB1.jpg": "c1c292187221bab077ac1b15e95cf665db35684c98d6193af56d2e8b7772fe20",
        "inst/extdata/counts/MOB1.tsv": "82c0691f800355369fd8a72ff44ba1e3112d4e44a790f490a9fa267876a9352e",
        "inst/extdata/counts/MOB2.jpg": "1079fe52f600ec212a6a59cef76b8697fcd776d0cdb10461ad3bb738eaa5c0b6",
        "inst/extdata/counts/MOB2.tsv": "449dcc351ede5c63f9afe313479dbb830ba32c6e86b56b258276304102d1f7e9",
        "inst/extdata/counts/MOB3.jpg": "0ac2c820ca6614e3ebc7fef3004a85c4623093b10741858e5c5328d7310606ca",
        "inst/extdata/counts/MOB3.tsv": "f0b9601a10d627d372c412cad4a4dde2a1dee9f2433e51f07ca26d534be015ea",
        "inst/extdata/counts/alignment_table_MOB1.tsv": "91ade06cf93bc0b3cd728846c34e310a8365200d1ad33498e6a0eb6951a92164",
        "inst/extdata/counts/alignment_table_MOB2.tsv": "6d86b226386b0a08f825b3bff4b5c359f00fd52d3f53d77db0376b0f7e0ec30d",
        "inst/extdata/counts/alignment_table_MOB3.tsv": "da0ce26ad12b94b6d0784ddc1c0c76e998d3bbd2579bad6aa8c4ac2c4f7f2e33",
        "inst/extdata/metaData.csv": "4e328177dc17c2744a0822eab6ee199ded7de755451eae29b9fefe74bbc690f4",
        "inst/extdata/mouse_genes.tsv.gz": "914e92c5d3f57770ed89a1db9ba64a95dfcbe2f0592027551eaa3e05b47495d9",
    },
    GIOTTO: {
        "inst/Mini_datasets/Visium/Raw/images/deg_image.png": "4ce4375b2d20d1da98cd1e3ec44af3fa916fe57c96cb50094355a201169ac429",
        "inst/Mini_datasets/Visium/Raw/images/deg_image2.png": "23e9d142cf8930245ae5a29300f91f3503da6dd887926b70fed65ec80327e51f",
        "inst/Mini_datasets/Visium/Raw/scalefactors_json.json": "9d1d6deb0dd6543c44def327a0f7924ee7a0bfab6d01e9b41534abc9d16b3cbf",
        "inst/Mini_datasets/Visium/Raw/visium_DG_expr.txt.gz": "562a7f942ddc31e7c4116f32526a77a4b431b1ab2c2a80965cd2cc55afe76d30",
        "inst/Mini_datasets/Visium/Raw/visium_DG_locs.txt": "864ac77d7db033d1cb60587cf292d91af2d4ce0136f7c5e87f22edf0ca28b50c",
        "inst/Mini_datasets/Visium/Raw/visium_DG_meta.txt": "23fe2b2b15bc27f7c32c43b29aa45888fe2f47537f3efaf3062841e303071e47",
    },
    SCANPY: {
        "tests/_data/visium_data/1.0.0/filtered_feature_bc_matrix.h5": "9b6cb386df8327ea7aec1d3ea87c73bac766dbf9b03003d70154c024c61f855a",
        "tests/_data/visium_data/1.0.0/spatial/scalefactors_json.json": "569586afb623a0aa90aaa7997894d954ea4242e5796e9fedfed4826f6be349dc",
        "tests/_data/visium_data/1.0.0/spatial/tissue_hires_image.png": "2647a9d1ac01e4269b669cc183dd0b4d0ea5c69c2de97b6c02d19d53002cc01e",
        "tests/_data/visium_data/1.0.0/spatial/tissue_lowres_image.png": "7069e504911a86c16aac826194fd28a3a0883d05e7ccb84b72781635c676891d",
        "tests/_data/visium_data/1.0.0/spatial/tissue_positions_list.csv": "c0703fb655e1ba42b4ad355284311635de035b947820886f41e3c4c62873d5aa",
    },
}


class DataUnavailableError(FileNotFoundError):
    """A public data file is neither in the data folder nor downloadable."""


def data_dir() -> Path:
    """The folder datasets are read from and cached in."""
    if settings.data_dir is not None:
        return Path(settings.data_dir).expanduser()
    import pooch

    return Path(pooch.os_cache("sq_spade"))


def fetch(origin: Origin, path: str) -> Path:
    """Local path of ``path`` in ``origin``'s repository, downloading it if needed and possible.

    Raises
    ------
    DataUnavailableError
        When the file is not cached and cannot be downloaded; the message names the file and
        ``SQ_SPADE_DATA_DIR``.
    """
    import pooch

    registry = REGISTRY[origin]
    if path not in registry:
        raise KeyError(f"{path!r} is not a registered file of {origin.repo}.")
    root = data_dir() / origin.folder
    local = root / path
    pup = pooch.create(path=root, base_url=origin.base_url, registry=dict(registry), retry_if_failed=0)
    try:
        return Path(pup.fetch(path, progressbar=False))
    except Exception as e:  # network errors come from requests/urllib; hash errors from pooch
        hint = (f"Point SQ_SPADE_DATA_DIR (now {str(settings.data_dir)!r}) at a folder holding "
                f"'{origin.folder}/{path}' (for example a clone of the shared data folder), or give this "
                "machine network access.")
        raise DataUnavailableError(
            f"Could not get {origin.folder}/{path} (from {origin.repo}@{origin.commit[:7]}): {type(e).__name__}: "
            f"{str(e)[:200]}. Looked in {str(local)!r}. {hint}"
        ) from e

"""Spatial domains: clusters of spots or tiles from predicted expression or an embedding.

mclSTExp's claim is that predicted expression finds the regions pathologists annotate. Here the
representation (a layer, an ``obsm`` key or ``X``) is standardised, reduced by PCA, optionally
smoothed over each spot's spatial neighbours (squidpy's ``spatial_neighbors``, per section), and
clustered by scikit-learn's k-means (``n_domains`` clusters) or scanpy's Leiden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sq_spade import _constants as K
from sq_spade._settings import settings
from sq_spade._validation import check_choice, check_positive_int, get_table, is_spatialdata

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

def representation(adata: AnnData, use: str) -> tuple[np.ndarray, str]:
    """The matrix named by ``use`` (a layer, an ``obsm`` key or ``"X"``) and where it was found."""
    import scipy.sparse as sp

    if use == "X":
        x, where = adata.X, "X"
    elif use in adata.layers:
        x, where = adata.layers[use], f"layers[{use!r}]"
    elif use in adata.obsm:
        x, where = adata.obsm[use], f"obsm[{use!r}]"
    else:
        raise KeyError(f"`use={use!r}` is neither a layer ({list(adata.layers)}) nor an obsm key "
                       f"({list(adata.obsm)}) of the table, nor 'X'.")
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"`use={use!r}` ({where}) has shape {x.shape}; expected (n_obs, n_features > 0).")
    if not np.isfinite(x).all():
        raise ValueError(f"`use={use!r}` ({where}) has non-finite values.")
    return x, where


def _has(adata: AnnData, use: str) -> bool:
    return use == "X" or use in adata.layers or use in adata.obsm


def _smooth(x: np.ndarray, adata: AnnData, n_neighbors: int, rounds: int) -> np.ndarray:
    """Average each row with its spatial neighbours (squidpy graph per section), ``rounds`` times."""
    import anndata as ad
    import scipy.sparse as sp
    import squidpy as sq

    if K.OBSM.SPATIAL not in adata.obsm:
        raise ValueError(f"`smooth` needs spot positions in `obsm[{K.OBSM.SPATIAL!r}]`; the table has none.")
    light = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    light.obsm[K.OBSM.SPATIAL] = np.asarray(adata.obsm[K.OBSM.SPATIAL], dtype=np.float64)
    lib = None
    if K.OBS.SECTION in adata.obs:
        light.obs[K.OBS.SECTION] = pd.Categorical(adata.obs[K.OBS.SECTION].astype(str))
        lib = K.OBS.SECTION if light.obs[K.OBS.SECTION].nunique() > 1 else None
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.8.2; older: spatial_neighbors
    if knn is not None:
        knn(light, n_neighs=n_neighbors, library_key=lib)
    else:
        sq.gr.spatial_neighbors(light, coord_type="generic", n_neighs=n_neighbors, library_key=lib)
    a = sp.csr_matrix(light.obsp["spatial_connectivities"], dtype=np.float64)
    a = a + sp.identity(a.shape[0], format="csr")
    deg = np.asarray(a.sum(1)).ravel()
    p = sp.diags(1.0 / deg) @ a
    for _ in range(rounds):
        x = p @ x
    return x


def spatial_domains(
    sdata: SpatialData | AnnData,
    *,
    use: str = K.LAYERS.PREDICTED,
    n_domains: int | None = 5,
    method: K.DomainMethod = "kmeans",
    n_pcs: int | None = 20,
    smooth: int = 0,
    n_neighbors: int = 6,
    resolution: float = 1.0,
    seed: int | None = None,
    table_key: str = K.TABLES.DEFAULT,
    predictions_key: str = K.TABLES.PREDICTED,
    key_added: str = K.OBS.DOMAIN,
    copy: bool = False,
) -> AnnData | None:
    """Cluster spots (or tiles) into spatial domains from a predicted layer or an embedding.

    The representation is standardised per column, reduced to ``n_pcs`` principal components,
    optionally averaged ``smooth`` times over each spot's ``n_neighbors`` spatial neighbours
    (squidpy's ``spatial_neighbors``, within each section), then clustered.

    Parameters
    ----------
    sdata
        A SpatialData or an AnnData. In a SpatialData, ``use`` is looked up in the table
        ``table_key``, then in the predictions table ``predictions_key``; the domains go to the
        table where it was found.
    use
        A layer (e.g. ``"predicted"``, ``"log1p_cp10k"``), an ``obsm`` key (e.g. ``"X_spade"``,
        ``"X_efficientnet_lite0"``) or ``"X"``.
    n_domains
        Number of domains (k-means); ignored by Leiden, which takes ``resolution``.
    method
        ``"kmeans"`` (scikit-learn) or ``"leiden"`` (scanpy's, on the symmetric 15-nearest-neighbour
        graph of the components).
    n_pcs
        Principal components kept (``None``: no PCA).
    smooth
        Rounds of neighbour averaging (0: none).
    n_neighbors
        Spatial neighbours of each spot for smoothing.
    resolution
        Leiden's resolution.
    seed
        Random seed of PCA, k-means and Leiden (default ``sqs.settings.seed``).
    table_key
        Table of a SpatialData searched first.
    predictions_key
        Predictions table of a SpatialData (from :func:`predict_expression`), searched second.
    key_added
        ``obs`` column written (categorical domain ids ``"0"``, ``"1"``...).
    copy
        Return a copy of the table with the domains instead of writing in place.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True``. Writes ``obs[key_added]`` and
    ``uns['sq_spade_domains'][key_added]`` (the parameters). Nothing is written on error.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> sqs.pp.normalize(sd)
    >>> sqs.tl.spatial_domains(sd, use="log1p_cp10k", n_domains=3)
    >>> sd.tables["table"].obs["domain"].nunique()
    3
    """
    seed = settings.seed if seed is None else seed
    adata = get_table(sdata, table_key, arg="sdata")
    if is_spatialdata(sdata) and not _has(adata, use) and predictions_key in sdata.tables \
            and _has(sdata.tables[predictions_key], use):
        adata = sdata.tables[predictions_key]
    check_choice(method, "method", K.DOMAIN_METHODS)
    if method == "kmeans":
        n_domains = check_positive_int(n_domains, "n_domains")
        if n_domains > adata.n_obs:
            raise ValueError(f"`n_domains={n_domains}` exceeds the number of rows ({adata.n_obs}).")
    n_pcs = check_positive_int(n_pcs, "n_pcs", allow_none=True)
    smooth = check_positive_int(smooth, "smooth", allow_zero=True)
    n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
    x, where = representation(adata, use)
    sd_ = x.std(0)
    x = (x - x.mean(0)) / np.where(sd_ > 0, sd_, 1.0)
    if n_pcs is not None and x.shape[1] > n_pcs and x.shape[0] > n_pcs:
        from sklearn.decomposition import PCA

        x = PCA(n_components=n_pcs, random_state=seed).fit_transform(x)
    if smooth:
        x = _smooth(x, adata, n_neighbors, smooth)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(x)
    else:
        import scanpy as sc
        from sklearn.neighbors import kneighbors_graph

        # a symmetric 15-nearest-neighbour graph of the components (no UMAP weights: no numba JIT)
        graph = kneighbors_graph(x, n_neighbors=min(15, x.shape[0] - 1), include_self=False)
        graph = graph.maximum(graph.T)
        import anndata as ad

        light = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
        sc.tl.leiden(light, adjacency=graph, resolution=resolution, random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False)
        labels = light.obs["leiden"].astype(int).to_numpy()
    # number domains by size, largest first, so that ids are stable across runs
    order = pd.Series(labels).value_counts().index.tolist()
    relabel = {old: new for new, old in enumerate(order)}
    ids = np.array([relabel[v] for v in labels])
    out = adata.copy() if copy else adata
    out.obs[key_added] = pd.Categorical(ids.astype(str), categories=[str(i) for i in range(len(order))])
    out.uns.setdefault(K.UNS.DOMAINS, {})[key_added] = {
        "use": use, "source": where, "method": method, "n_domains": int(len(order)), "n_pcs": n_pcs,
        "smooth": smooth, "n_neighbors": n_neighbors, "resolution": float(resolution), "seed": int(seed)}
    return out if copy else None


def domain_scores(truth: Any, domains: Any, *, n_shuffles: int = 100, seed: int | None = None) -> dict[str, float]:
    """ARI and NMI of ``domains`` against ``truth`` labels, with the shuffled-label floor.

    Rows whose truth is missing are left out. The floor is the mean (and 95th percentile) over
    ``n_shuffles`` random permutations of ``domains`` (``seed``: default ``sqs.settings.seed``).

    Examples
    --------
    >>> domain_scores(["a", "a", "b", "b"], [0, 0, 1, 1])["ari"]
    1.0
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    seed = settings.seed if seed is None else seed
    t = pd.Series(np.asarray(truth, dtype=object))
    d = np.asarray(domains, dtype=object)
    if len(t) != len(d):
        raise ValueError(f"`truth` ({len(t)}) and `domains` ({len(d)}) must have the same length.")
    keep = t.notna().to_numpy()
    t, d = t[keep].astype(str).to_numpy(), d[keep].astype(str)
    rng = np.random.default_rng(seed)
    shuf = [(adjusted_rand_score(t, p), normalized_mutual_info_score(t, p))
            for p in (rng.permutation(d) for _ in range(n_shuffles))]
    s = np.array(shuf) if shuf else np.zeros((1, 2))
    return {"ari": float(adjusted_rand_score(t, d)), "nmi": float(normalized_mutual_info_score(t, d)),
            "ari_shuffled": float(s[:, 0].mean()), "nmi_shuffled": float(s[:, 1].mean()),
            "ari_shuffled_p95": float(np.quantile(s[:, 0], 0.95)),
            "nmi_shuffled_p95": float(np.quantile(s[:, 1], 0.95)), "n": int(keep.sum())}

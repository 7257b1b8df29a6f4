"""Gene panels chosen on training sections only, and panel-wise normalisation.

:func:`panel_expression` is the one place where a table's counts become the normalised
expression of a panel (the targets and inputs of every method, and the retrieval values).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from sq_spade import _constants as K
from sq_spade._deprecate import renamed_arguments
from sq_spade._docs import inject_docs
from sq_spade._logging import info as log_info
from sq_spade._utils import copy_data
from sq_spade._validation import (
    check_choice,
    check_positive,
    check_sections,
    get_table,
    section_labels,
)
from sq_spade.io._sections import genes_present_in

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

_MITO = re.compile(r"^(MT-|mt-|Mt-)")
_RIBO = re.compile(r"^(RPS|RPL|MRPS|MRPL|Rps|Rpl|Mrps|Mrpl)\d")


def _counts(adata: AnnData, layer: str | None) -> sp.csr_matrix:
    X = adata.X if layer is None else adata.layers[layer]
    X = sp.csr_matrix(X, dtype=np.float32)
    data = X.data
    where = "X" if layer is None else f"layers[{layer!r}]"
    if not np.isfinite(data).all():
        raise ValueError(f"`{where}` must hold raw counts; it contains NaN or infinite values.")
    if (data < 0).any():
        raise ValueError(f"`{where}` must hold raw counts; it contains negative values.")
    if not np.allclose(data, np.round(data)):
        raise ValueError(f"`{where}` must hold raw integer counts; found non-integer values "
                         "(pass `counts_layer=` naming a layer of raw counts).")
    return X


def log1p_cp10k(X: sp.spmatrix | np.ndarray, *, target_sum: float = 1e4) -> sp.csr_matrix:
    """Library-size normalise rows to ``target_sum`` then log1p (rows summing to 0 stay 0)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    lib = np.asarray(X.sum(1)).ravel()
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    Y = sp.diags(scale.astype(np.float32)) @ X
    Y.data = np.log1p(Y.data)
    return sp.csr_matrix(Y)


def _exclusion_mask(names: np.ndarray, exclude_mito: bool, exclude_ribo: bool) -> np.ndarray:
    keep = np.ones(len(names), bool)
    if exclude_mito:
        keep &= ~np.array([bool(_MITO.match(n)) for n in names])
    if exclude_ribo:
        keep &= ~np.array([bool(_RIBO.match(n)) for n in names])
    return keep


@renamed_arguments(data="sdata")
@inject_docs
def select_genes(
    sdata: AnnData | SpatialData,
    method: K.PanelMethod | Sequence[str] = "spade",
    *,
    n_top: int = 50,
    train_sections: Sequence[str] | str | None = None,
    table_key: str = K.TABLES.DEFAULT,
    counts_layer: str | None = None,
    exclude_mito: bool = True,
    exclude_ribo: bool = True,
    key_added: str = K.VAR.PANEL,
    inplace: bool = True,
) -> list[str] | None:
    """Choose a gene panel from the training sections only.

    Parameters
    ----------
    sdata
        AnnData or SpatialData (its table ``table_key``).
    method
        ``"spade"``: per training section, ``normalize_total`` + ``log1p`` +
        ``highly_variable_genes(n_top_genes=n_top)`` over the genes measured in every training
        section; the panel is the union (matched by name). ``"heg"``: the ``n_top`` genes with
        the highest mean log1p-CP10k expression over the training spots. A list of gene names:
        that panel (names absent from the table are dropped with a warning).
    n_top
        Genes per section (``"spade"``) or in total (``"heg"``).
    train_sections
        Sections the panel is computed from (default: all). Choose only training sections so
        evaluation cannot leak.
    %(table_key)s
    counts_layer
        Layer of raw counts (default ``X``).
    exclude_mito, exclude_ribo
        Leave out mitochondrial (``MT-``) and ribosomal (``RPS``/``RPL``/``MRPS``/``MRPL``) genes.
    key_added
        Boolean ``var`` column and ``uns`` entry written.
    inplace
        Write ``var[key_added]`` and ``uns[key_added]`` (panel, method, sections); otherwise
        return the panel.

    Returns
    -------
    The panel (list of gene names in table order) when ``inplace=False``, else ``None``.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> sqs.pp.select_genes(sd, "heg", n_top=5, inplace=False)
    ['gene0', 'gene1', 'gene2', 'gene4', 'gene5']
    """
    import scanpy as sc
    from anndata import AnnData

    adata = get_table(sdata, table_key)
    names = np.array([str(g) for g in adata.var_names], dtype=object)
    if adata.var_names.has_duplicates:
        raise ValueError("The table has duplicated gene names; call `var_names_make_unique()` first.")
    if adata.n_obs == 0:
        raise ValueError("The table is empty (no spots).")
    sections = check_sections(adata, train_sections, arg="train_sections")
    labels = section_labels(adata)
    train_rows = np.isin(labels, sections)
    if isinstance(method, str):
        check_choice(method, "method", K.PANEL_METHODS)
        check_positive(n_top, "n_top", integer=True)
        usable = genes_present_in(adata, sections) & _exclusion_mask(names, exclude_mito, exclude_ribo)
        X = _counts(adata, counts_layer)
        if method == "heg":
            norm = log1p_cp10k(X[train_rows][:, usable])
            means = np.asarray(norm.mean(0)).ravel()
            order = np.argsort(-means, kind="stable")[:n_top]
            chosen = set(names[usable][order])
        else:
            chosen = set()
            for s in sections:
                rows = labels == s
                sub = AnnData(X=X[rows][:, usable].copy())
                sub.var_names = names[usable]
                sc.pp.filter_genes(sub, min_cells=1)
                if sub.n_vars == 0:
                    raise ValueError(f"Section {s!r} has no expressed gene among the usable ones.")
                sc.pp.normalize_total(sub, target_sum=1e4)
                sc.pp.log1p(sub)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sc.pp.highly_variable_genes(sub, n_top_genes=min(n_top, sub.n_vars), flavor="seurat")
                hv = sub.var["highly_variable"].to_numpy()
                ranked = sub.var["dispersions_norm"].to_numpy()
                top = np.argsort(-np.nan_to_num(ranked, nan=-np.inf), kind="stable")
                top = [t for t in top if hv[t]][:n_top]
                chosen.update(sub.var_names[top])
        panel = [str(g) for g in names if g in chosen]
        params = {"method": method, "n_top": int(n_top)}
    else:
        wanted = [str(g) for g in method]
        if not wanted:
            raise ValueError("`method` is an empty gene list.")
        present = set(names)
        panel_set = {g for g in wanted if g in present}
        if not panel_set:
            raise ValueError(f"None of the {len(wanted)} genes of `method` is in the table (e.g. {wanted[:3]}).")
        missing = [g for g in wanted if g not in present]
        if missing:
            warnings.warn(f"{len(missing)} of {len(wanted)} panel genes are not in the table and are dropped "
                          f"(e.g. {missing[:5]}).", UserWarning, stacklevel=2)
        keep = _exclusion_mask(np.array(sorted(panel_set)), exclude_mito, exclude_ribo)
        panel_set = {g for g, k in zip(sorted(panel_set), keep, strict=True) if k}
        panel = [str(g) for g in names if g in panel_set]
        params = {"method": "list", "n_requested": len(wanted), "n_missing": len(missing)}
    if not panel:
        raise ValueError("The panel is empty after excluding mitochondrial/ribosomal genes.")
    if not inplace:
        return panel
    adata.var[key_added] = np.isin(names, panel)
    adata.uns[key_added] = {**params, "genes": list(panel), "train_sections": list(sections),
                            "exclude_mito": bool(exclude_mito), "exclude_ribo": bool(exclude_ribo)}
    log_info("selected a panel of %d genes (%s) from sections %s: var[%r] and uns[%r]", len(panel),
             params["method"], list(sections), key_added, key_added)
    return None


def panel_genes(adata: AnnData, panel: str | Sequence[str] | None = None) -> list[str]:
    """Resolve a panel argument: a list of genes, a boolean var column, or the default panel."""
    if panel is None:
        panel = K.VAR.PANEL if K.VAR.PANEL in adata.var else None
        if panel is None:
            return adata.var_names.astype(str).tolist()
    if isinstance(panel, str):
        if panel not in adata.var:
            raise KeyError(f"`panel={panel!r}` is not a boolean column of `var`; run sqs.pp.select_genes first "
                           "or pass a list of genes.")
        return adata.var_names[adata.var[panel].to_numpy(bool)].astype(str).tolist()
    genes = [str(g) for g in panel]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"`panel` genes absent from the table: {missing[:5]} ({len(missing)} in all).")
    return genes


def check_panel_measured(table: AnnData, genes: Sequence[str], sections: Sequence[str] | None = None, *,
                         arg: str = "panel") -> list[str]:
    """``genes`` as a list, once each, all in the table and measured in every one of ``sections``.

    ``sections=None`` means the sections whose spots the table holds (``obs['section']``).

    Genes that a section did not measure were zero-filled when sections with different gene
    sets were combined (``varm['genes_present']``); used as data they would be measured zeros.
    Raises a ValueError (a KeyError for genes absent from the table) naming ``arg``.

    Examples
    --------
    >>> t = sqs.datasets.synthetic_section().tables["table"]
    >>> check_panel_measured(t, ["gene0", "gene0"])
    Traceback (most recent call last):
    ...
    ValueError: `panel` lists genes more than once: ['gene0'].
    """
    from collections import Counter

    genes = [str(g) for g in genes]
    dup = sorted(g for g, c in Counter(genes).items() if c > 1)
    if dup:
        raise ValueError(f"`{arg}` lists genes more than once: {dup[:5]}.")
    cols = table.var_names.get_indexer(genes)
    if (cols < 0).any():
        missing = [g for g, c in zip(genes, cols, strict=True) if c < 0]
        raise KeyError(f"`{arg}`: {len(missing)} panel genes are absent from the table (e.g. {missing[:5]}).")
    if K.VARM.GENES_PRESENT in table.varm:
        m = table.varm[K.VARM.GENES_PRESENT]
        if sections is None:  # the sections whose spots the table holds (a subset keeps varm's other columns)
            sections = (table.obs[K.OBS.SECTION].astype(str).unique() if K.OBS.SECTION in table.obs
                        else m.columns)
        secs = [str(s) for s in sections if s in m.columns]
        unmeasured = {s: [genes[i] for i in np.flatnonzero(~np.asarray(m[s], bool)[cols])] for s in secs}
        unmeasured = {s: g for s, g in unmeasured.items() if g}
        if unmeasured:
            s0, g0 = next(iter(unmeasured.items()))
            raise ValueError(
                f"`{arg}`: genes not measured in section(s) {sorted(unmeasured)[:5]} (e.g. {g0[:5]} in {s0!r}; "
                f"varm[{K.VARM.GENES_PRESENT!r}]). They were zero-filled when the sections were combined and "
                f"would be used as measured zeros: leave them out of the panel, or leave those sections out.")
    return genes


def panel_expression(table: AnnData, panel: Sequence[str], *, gene_input: K.GeneInput = "log1p_cp10k",
                     counts_layer: str | None = None, allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Expression of ``panel`` genes ``(N, G)`` float32 and a mask of the genes present.

    ``log1p_cp10k`` normalises each spot's library over the panel genes present; ``raw`` gives
    the counts.

    Parameters
    ----------
    table
        AnnData with raw counts in ``X`` (or ``counts_layer``).
    panel
        Gene names, in the order of the output's columns.
    gene_input
        ``"log1p_cp10k"`` or ``"raw"``.
    counts_layer
        Layer of raw counts (default ``X``).
    allow_missing
        Give genes absent from the table zero columns (``False``: raise a KeyError).

    Examples
    --------
    >>> t = sqs.datasets.synthetic_section().tables["table"]
    >>> expr, present = panel_expression(t, ["gene0", "gene1"])
    >>> expr.shape, bool(present.all())
    ((64, 2), True)
    """
    check_choice(gene_input, "gene_input", K.GENE_INPUTS)
    cols = table.var_names.get_indexer(list(panel))
    present = cols >= 0
    if not present.all() and not allow_missing:
        missing = [g for g, ok in zip(panel, present, strict=True) if not ok]
        raise KeyError(f"{len(missing)} panel genes are absent from the table (e.g. {missing[:5]}).")
    X = _counts(table, counts_layer)[:, cols[present]]
    Y = log1p_cp10k(X) if gene_input == "log1p_cp10k" else X
    out = np.zeros((table.n_obs, len(panel)), np.float32)
    out[:, present] = Y.toarray()
    return out, present


@renamed_arguments(data="sdata", layer_added="key_added")
@inject_docs
def normalize(
    sdata: AnnData | SpatialData,
    *,
    panel: str | Sequence[str] | None = None,
    table_key: str = K.TABLES.DEFAULT,
    counts_layer: str | None = None,
    target_sum: float = 1e4,
    key_added: str = K.LAYERS.NORMALIZED,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Library size over the panel genes, scaled to ``target_sum``, then log1p, into a layer.

    Raw counts stay where they are (``X`` or ``counts_layer``). Every gene of the table gets a
    value, but the library size counts the panel genes only, as the methods' targets do.

    Parameters
    ----------
    sdata
        AnnData or SpatialData.
    panel
        Gene list, boolean ``var`` column, or ``None`` for the panel of
        :func:`select_genes` (or all genes when none was chosen).
    %(table_key)s
    counts_layer
        Layer of raw counts (default ``X``).
    target_sum
        Library size after scaling.
    key_added
        Layer written (sparse float32; default ``"log1p_cp10k"``).
    copy
        Normalise a copy of ``sdata`` and return it.

    Returns
    -------
    The normalised copy when ``copy=True``, else ``None``.

    Examples
    --------
    >>> sd = sqs.datasets.synthetic_section()
    >>> sqs.pp.normalize(sd)
    >>> "log1p_cp10k" in sd.tables["table"].layers
    True
    """
    if copy:
        sdata = copy_data(sdata)
    adata = get_table(sdata, table_key)
    check_positive(target_sum, "target_sum")
    genes = panel_genes(adata, panel)
    X = _counts(adata, counts_layer)
    cols = adata.var_names.get_indexer(genes)
    lib = np.asarray(X[:, cols].sum(1)).ravel()
    if (lib == 0).any():
        warnings.warn(f"{int((lib == 0).sum())} spots have no counts over the panel; their normalised values are 0.",
                      UserWarning, stacklevel=2)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    Y = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ X)
    Y.data = np.log1p(Y.data)
    adata.layers[key_added] = Y
    adata.uns.setdefault(K.UNS.NORMALIZE, {})[key_added] = {
        "target_sum": float(target_sum), "n_panel_genes": len(genes), "counts": counts_layer or "X"}
    log_info("normalised %d spots (library over %d panel genes, log1p CP%g): layers[%r]", adata.n_obs, len(genes),
             target_sum, key_added)
    return sdata if copy else None

/* processors._native: the per-event loops that cost most in Python, over a whole batch in C.
 *
 * gather: struct fields → Arrow buffers in one C pass per column (sinks/columns.py, ``_plain_columns``).
 * combine: each event's combination of some text fields, numbered (sinks/columns.py, ``_combinations``).
 * timestamps: each event's UTC datetime as epoch seconds (processors/validate.py, ``_timestamps``).
 *
 * Why: building an Arrow column from decoded events in Python is ``list(map(attrgetter(f), events))``
 * and then ``pa.array(values)``, ~0.1-0.2 µs per event and column, for ~20 columns. Here each
 * field is read at its slot offset (msgspec structs keep fields as member slots, like
 * ``__slots__``) and written straight into the buffers pyarrow wraps without copying.
 *
 * Safety: every object's type is checked, every field's slot is found through the type's own
 * member descriptor, and every value's Python type is checked before it is read. Anything
 * unexpected raises (TypeError, OverflowError, UnicodeEncodeError) and the caller falls back to
 * the Python path, which then fails or succeeds exactly as it always did.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <structmember.h>
#include <string.h>

enum kind { K_STR = 0, K_I64 = 1, K_U32 = 2, K_U16 = 3, K_I32 = 4, K_F64 = 5, K_BOOL = 6, K_STR_TUPLE = 7, K_ANY_LEN = 8 };

#define MAX_TYPES 4

typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset;
} slot_t;

/* The slot offset of ``name`` in ``type`` (found through the MRO), or -1 with an exception set. */
static Py_ssize_t slot_offset(PyTypeObject *type, PyObject *name) {
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
    if (descr == NULL) return -1;
    /* a member descriptor of this type or a base: one copied onto an unrelated class would point
     * past the object */
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type) || !PyType_IsSubtype(type, PyDescr_TYPE(descr))) {
        Py_DECREF(descr);
        PyErr_Format(PyExc_TypeError, "%R is not a slot of %s", name, type->tp_name);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    Py_ssize_t offset = (member->type == T_OBJECT_EX || member->type == T_OBJECT) ? member->offset : -1;
    Py_DECREF(descr);
    if (offset < 0) PyErr_Format(PyExc_TypeError, "%R of %s is not an object slot", name, type->tp_name);
    return offset;
}

/* The field's value (borrowed), or NULL with an exception set (an unset slot: Python raises
 * AttributeError there, so the caller's Python path does). */
static inline PyObject *field(PyObject *obj, slot_t *slots, int *ntypes, PyObject *name) {
    PyTypeObject *type = Py_TYPE(obj);
    Py_ssize_t offset = -1;
    for (int i = 0; i < *ntypes; i++) {
        if (slots[i].type == type) {
            offset = slots[i].offset;
            break;
        }
    }
    if (offset < 0) {
        if (*ntypes == MAX_TYPES) {
            PyErr_SetString(PyExc_TypeError, "too many event types in one batch");
            return NULL;
        }
        offset = slot_offset(type, name);
        if (offset < 0) return NULL;
        slots[*ntypes].type = type;
        slots[*ntypes].offset = offset;
        (*ntypes)++;
    }
    PyObject *value = *(PyObject **)((char *)obj + offset);
    if (value == NULL) PyErr_Format(PyExc_TypeError, "%R is not set", name);
    return value;
}

/* Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's days_from_civil). */
static inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const int64_t yoe = y - era * 400;
    const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* Microseconds since the epoch of a datetime, its tzinfo ignored (the caller checks it is UTC). */
static inline int64_t utc_micros(PyObject *v) {
    int64_t days = days_from_civil(PyDateTime_GET_YEAR(v), PyDateTime_GET_MONTH(v), PyDateTime_GET_DAY(v));
    return (days * 86400 + PyDateTime_DATE_GET_HOUR(v) * 3600 + PyDateTime_DATE_GET_MINUTE(v) * 60 +
            PyDateTime_DATE_GET_SECOND(v)) * 1000000 + PyDateTime_DATE_GET_MICROSECOND(v);
}

/* A field, or a field of a field (``params.temperature``: NULL when the outer one is None). */
typedef struct {
    PyObject *name, *inner;
    slot_t outer_slots[MAX_TYPES], inner_slots[MAX_TYPES];
    int outer_types, inner_types;
} path_t;

static inline PyObject *path_value(PyObject *obj, path_t *p) {
    PyObject *v = field(obj, p->outer_slots, &p->outer_types, p->name);
    if (v == NULL || p->inner == NULL || v == Py_None) return v;
    return field(v, p->inner_slots, &p->inner_types, p->inner);
}

static PyObject *new_bytes(Py_ssize_t size, char **data) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, size);
    if (b != NULL) {
        *data = PyBytes_AS_STRING(b);
        memset(*data, 0, (size_t)size);
    }
    return b;
}

/* 0 when every item of ``events`` (a list) is an instance of ``cls``; else -1 with TypeError set.
 * Each helper checks this first, so it reads only the struct its caller names (``slot_offset``
 * is what keeps the reads inside each object). */
static int all_of_type(PyObject *events, PyObject *cls) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(events); i++) {
        PyObject *event = PyList_GET_ITEM(events, i);
        if (!PyObject_TypeCheck(event, (PyTypeObject *)cls)) {
            PyErr_Format(PyExc_TypeError, "event %zd is a %s, not a %s", i, Py_TYPE(event)->tp_name,
                         ((PyTypeObject *)cls)->tp_name);
            return -1;
        }
    }
    return 0;
}

/* (null_count, validity or None, ...buffers) for one column. */
static PyObject *gather_column(PyObject *events, Py_ssize_t n, PyObject *name, PyObject *inner, int kind) {
    path_t path = {.name = name, .inner = inner};
    PyObject *validity = NULL, *data = NULL, *offsets = NULL, *child_offsets = NULL, *result = NULL;
    char *valid_bits = NULL, *buf = NULL;
    Py_ssize_t nulls = 0;
    PyObject **items = PySequence_Fast_ITEMS(events);

    if (kind == K_ANY_LEN) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = path_value(items[i], &path);
            if (v == NULL) return NULL;
            if (v == Py_None) continue;
            Py_ssize_t len = PyObject_Length(v);
            if (len < 0) return NULL;
            if (len > 0) Py_RETURN_TRUE;
        }
        Py_RETURN_FALSE;
    }
    validity = new_bytes((n + 7) / 8, &valid_bits);
    if (validity == NULL) goto fail;

    if (kind == K_STR || kind == K_STR_TUPLE) {
        /* every value's UTF-8 pointer and size first (an ASCII str's UTF-8 is its own storage), then
         * one buffer of the total size and the copies */
        const char **ptrs = NULL;
        Py_ssize_t *lens = NULL;
        Py_ssize_t count = 0, total = 0;
        int32_t *offs, *child;
        char *offs_raw, *child_raw;
        if (kind == K_STR_TUPLE) {
            offsets = new_bytes((n + 1) * 4, &offs_raw);
            if (offsets == NULL) goto fail;
            offs = (int32_t *)offs_raw;
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *v = path_value(items[i], &path);
                if (v == NULL) goto fail;
                if (v == Py_None) {
                    nulls++;
                } else if (PyTuple_Check(v) || PyList_Check(v)) {
                    ((unsigned char *)valid_bits)[i >> 3] |= (unsigned char)(1u << (i & 7));
                    count += PySequence_Fast_GET_SIZE(v);
                } else {
                    PyErr_Format(PyExc_TypeError, "%R: expected a tuple of str", name);
                    goto fail;
                }
                if (count > INT32_MAX) {
                    PyErr_SetString(PyExc_OverflowError, "list column too long");
                    goto fail;
                }
                offs[i + 1] = (int32_t)count;
            }
        } else {
            count = n;
        }
        ptrs = PyMem_Malloc(sizeof(char *) * (size_t)(count ? count : 1));
        lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(count ? count : 1));
        if (ptrs == NULL || lens == NULL) {
            PyMem_Free(ptrs);
            PyMem_Free(lens);
            PyErr_NoMemory();
            goto fail;
        }
        Py_ssize_t k = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = path_value(items[i], &path);
            if (v == NULL) goto fail_strings;
            if (kind == K_STR) {
                if (v == Py_None) {
                    nulls++;
                    ptrs[k] = NULL;
                    lens[k++] = 0;
                    continue;
                }
                if (!PyUnicode_Check(v)) {
                    PyErr_Format(PyExc_TypeError, "%R: expected str, got %s", name, Py_TYPE(v)->tp_name);
                    goto fail_strings;
                }
                ((unsigned char *)valid_bits)[i >> 3] |= (unsigned char)(1u << (i & 7));
                ptrs[k] = PyUnicode_AsUTF8AndSize(v, &lens[k]);
                if (ptrs[k] == NULL) goto fail_strings;
                total += lens[k++];
            } else if (v != Py_None) {
                Py_ssize_t m = PySequence_Fast_GET_SIZE(v);
                PyObject **elems = PySequence_Fast_ITEMS(v);
                for (Py_ssize_t j = 0; j < m; j++) {
                    if (!PyUnicode_Check(elems[j])) {
                        PyErr_Format(PyExc_TypeError, "%R: expected a tuple of str", name);
                        goto fail_strings;
                    }
                    ptrs[k] = PyUnicode_AsUTF8AndSize(elems[j], &lens[k]);
                    if (ptrs[k] == NULL) goto fail_strings;
                    total += lens[k++];
                }
            }
            if (total > INT32_MAX) {
                PyErr_SetString(PyExc_OverflowError, "string column over 2 GiB");
                goto fail_strings;
            }
        }
        {
            PyObject *str_offsets = new_bytes((count + 1) * 4, &child_raw);
            if (str_offsets == NULL) goto fail_strings;
            data = new_bytes(total, &buf);
            if (data == NULL) {
                Py_DECREF(str_offsets);
                goto fail_strings;
            }
            child = (int32_t *)child_raw;
            Py_ssize_t at = 0;
            for (Py_ssize_t j = 0; j < count; j++) {
                if (lens[j]) memcpy(buf + at, ptrs[j], (size_t)lens[j]);
                at += lens[j];
                child[j + 1] = (int32_t)at;
            }
            if (kind == K_STR) offsets = str_offsets;
            else child_offsets = str_offsets;
        }
        PyMem_Free(ptrs);
        PyMem_Free(lens);
        goto done;
    fail_strings:
        PyMem_Free(ptrs);
        PyMem_Free(lens);
        goto fail;
    }

    if (kind == K_BOOL) {
        data = new_bytes((n + 7) / 8, &buf);
    } else {
        Py_ssize_t width = (kind == K_U16) ? 2 : (kind == K_U32 || kind == K_I32) ? 4 : 8;
        data = new_bytes(n * width, &buf);
    }
    if (data == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = path_value(items[i], &path);
        if (v == NULL) goto fail;
        if (v == Py_None) {
            nulls++;
            continue;
        }
        ((unsigned char *)valid_bits)[i >> 3] |= (unsigned char)(1u << (i & 7));
        if (kind == K_F64) {
            double d;
            if (PyFloat_Check(v)) d = PyFloat_AS_DOUBLE(v);  /* never calls back into Python */
            else if (PyLong_Check(v)) {
                /* an int converts exactly only up to 2**53, and pyarrow refuses the rest */
                int overflow;
                long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
                if (x == -1 && PyErr_Occurred()) goto fail;
                if (overflow || x > (1LL << 53) || x < -(1LL << 53)) {
                    PyErr_Format(PyExc_TypeError, "%R: int too large for an exact float", name);
                    goto fail;
                }
                d = (double)x;
            } else {
                PyErr_Format(PyExc_TypeError, "%R: expected float, got %s", name, Py_TYPE(v)->tp_name);
                goto fail;
            }
            ((double *)buf)[i] = d;
        } else if (kind == K_BOOL) {
            if (v == Py_True) ((unsigned char *)buf)[i >> 3] |= (unsigned char)(1u << (i & 7));
            else if (v != Py_False) {
                PyErr_Format(PyExc_TypeError, "%R: expected bool, got %s", name, Py_TYPE(v)->tp_name);
                goto fail;
            }
        } else {
            if (!PyLong_Check(v) || PyBool_Check(v)) {
                PyErr_Format(PyExc_TypeError, "%R: expected int, got %s", name, Py_TYPE(v)->tp_name);
                goto fail;
            }
            long long x = PyLong_AsLongLong(v);
            if (x == -1 && PyErr_Occurred()) goto fail;
            if ((kind == K_U32 && (x < 0 || x > 4294967295LL)) || (kind == K_U16 && (x < 0 || x > 65535)) ||
                (kind == K_I32 && (x < INT32_MIN || x > INT32_MAX))) {
                PyErr_Format(PyExc_OverflowError, "%R: %lld out of range", name, x);
                goto fail;
            }
            if (kind == K_U32) ((uint32_t *)buf)[i] = (uint32_t)x;
            else if (kind == K_U16) ((uint16_t *)buf)[i] = (uint16_t)x;
            else if (kind == K_I32) ((int32_t *)buf)[i] = (int32_t)x;
            else ((int64_t *)buf)[i] = (int64_t)x;
        }
    }

done:
    if (nulls == 0) {
        Py_DECREF(validity);
        validity = Py_NewRef(Py_None);
    }
    if (kind == K_STR_TUPLE)
        result = Py_BuildValue("(nNNNN)", nulls, validity, offsets, child_offsets, data);
    else if (kind == K_STR)
        result = Py_BuildValue("(nNNN)", nulls, validity, offsets, data);
    else
        result = Py_BuildValue("(nNN)", nulls, validity, data);
    return result;

fail:
    Py_XDECREF(validity);
    Py_XDECREF(data);
    Py_XDECREF(offsets);
    Py_XDECREF(child_offsets);
    return NULL;
}

static PyObject *gather(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *events, *cls, *specs;
    if (!PyArg_ParseTuple(args, "O!O!O!:gather", &PyList_Type, &events, &PyType_Type, &cls, &PyTuple_Type, &specs))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(events), m = PyTuple_GET_SIZE(specs);
    if (all_of_type(events, cls) < 0) return NULL;
    PyObject *out = PyList_New(m);
    if (out == NULL) return NULL;
    for (Py_ssize_t c = 0; c < m; c++) {
        PyObject *spec = PyTuple_GET_ITEM(specs, c), *name, *inner = NULL;
        int kind;
        if (!PyArg_ParseTuple(spec, "Ui|U:gather spec", &name, &kind, &inner)) goto fail;
        if (kind < K_STR || kind > K_ANY_LEN) {
            PyErr_Format(PyExc_ValueError, "unknown column kind %d", kind);
            goto fail;
        }
        PyObject *column = gather_column(events, n, name, inner, kind);
        if (column == NULL) goto fail;
        PyList_SET_ITEM(out, c, column);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* A hash of a str's code points (compact strings store them canonically: equal strings, equal
 * bytes), cheaper than str's SipHash, which msgspec's fresh strings have not cached yet. */
static inline Py_uhash_t text_hash(PyObject *v) {
    const unsigned char *p = PyUnicode_DATA(v);
    Py_ssize_t len = PyUnicode_GET_LENGTH(v) * PyUnicode_KIND(v);
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)len, w;
    for (; len >= 8; p += 8, len -= 8) {
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 31;
    }
    w = 0;
    memcpy(&w, p, (size_t)len);
    h = (h ^ w) * 0x94D049BB133111EBULL;
    return (Py_uhash_t)(h ^ (h >> 29));
}

/* combine(events, cls, names) -> (codes, distinct): each event's combination of these fields as a
 * small int32 code (bytes), numbered in order of first appearance, and the distinct combinations
 * as tuples: what a dict of tuples gives (``sinks.columns._combinations``), without a tuple and a
 * dict lookup per event. */
static PyObject *combine(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *events, *cls, *names;
    if (!PyArg_ParseTuple(args, "O!O!O!:combine", &PyList_Type, &events, &PyType_Type, &cls, &PyTuple_Type, &names))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(events), m = PyTuple_GET_SIZE(names);
    PyObject **items = PySequence_Fast_ITEMS(events);
    if (m < 1 || m > 64) {
        PyErr_SetString(PyExc_ValueError, "combine takes 1 to 64 fields");
        return NULL;
    }
    if (all_of_type(events, cls) < 0) return NULL;
    slot_t slots[64][MAX_TYPES];
    int ntypes[64] = {0};
    Py_ssize_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    Py_ssize_t *table = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)cap); /* event index of a combination's first */
    Py_hash_t *hashes = PyMem_Malloc(sizeof(Py_hash_t) * (size_t)cap);
    Py_ssize_t *firsts = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1)); /* code → first event */
    PyObject **values = PyMem_Malloc(sizeof(PyObject *) * (size_t)(m * (n ? n : 1))); /* borrowed */
    PyObject *codes = NULL, *distinct = NULL, *result = NULL;
    char *codes_raw;
    Py_ssize_t ncodes = 0;
    if (table == NULL || hashes == NULL || firsts == NULL || values == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t t = 0; t < cap; t++) table[t] = -1;
    codes = new_bytes(n * 4, &codes_raw);
    if (codes == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject **row = values + i * m;
        Py_uhash_t h = 0x345678UL;
        for (Py_ssize_t f = 0; f < m; f++) {
            PyObject *v = field(items[i], slots[f], &ntypes[f], PyTuple_GET_ITEM(names, f));
            if (v == NULL) goto fail;
            Py_uhash_t fh;
            if (v == Py_None) fh = 0x2545F4914F6CDD1DULL;
            else if (PyUnicode_CheckExact(v)) {
                if (PyUnicode_READY(v) < 0) goto fail;  /* a legacy string: its code points first */
                fh = text_hash(v);
            }
            else {  /* these fields are str or None; anything else takes the Python path */
                PyErr_Format(PyExc_TypeError, "%R: expected str or None", PyTuple_GET_ITEM(names, f));
                goto fail;
            }
            row[f] = v;
            h = (h ^ fh) * 1000003UL;
            h ^= h >> 27;
        }
        Py_hash_t hash = (Py_hash_t)(h == (Py_uhash_t)-1 ? 0 : h);
        Py_ssize_t t = (Py_ssize_t)((Py_uhash_t)hash & (Py_uhash_t)(cap - 1)), code = -1;
        while (table[t] >= 0) {
            if (hashes[t] == hash) {
                PyObject **other = values + firsts[table[t]] * m;
                int same = 1;
                for (Py_ssize_t f = 0; f < m && same; f++) {
                    PyObject *a = row[f], *b = other[f];
                    if (a == b) continue;
                    if (a == Py_None || b == Py_None) {
                        same = 0;
                        break;
                    }
                    Py_ssize_t len = PyUnicode_GET_LENGTH(a);  /* both exact str: checked when hashed */
                    same = len == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
                           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)(len * PyUnicode_KIND(a))) == 0;
                }
                if (same) {
                    code = table[t];
                    break;
                }
            }
            t = (t + 1) & (cap - 1);
        }
        if (code < 0) {
            code = ncodes++;
            firsts[code] = i;
            table[t] = code;
            hashes[t] = hash;
        }
        ((int32_t *)codes_raw)[i] = (int32_t)code;
    }
    distinct = PyList_New(ncodes);
    if (distinct == NULL) goto fail;
    for (Py_ssize_t c = 0; c < ncodes; c++) {
        PyObject *tuple = PyTuple_New(m);
        if (tuple == NULL) goto fail;
        for (Py_ssize_t f = 0; f < m; f++) PyTuple_SET_ITEM(tuple, f, Py_NewRef(values[firsts[c] * m + f]));
        PyList_SET_ITEM(distinct, c, tuple);
    }
    result = PyTuple_Pack(2, codes, distinct);
fail:
    Py_XDECREF(codes);
    Py_XDECREF(distinct);
done:
    PyMem_Free(table);
    PyMem_Free(hashes);
    PyMem_Free(firsts);
    PyMem_Free(values);
    return result;
}

/* timestamps(events, cls, name) -> [float]: each event's UTC datetime field as epoch seconds,
 * exactly what ``datetime.timestamp()`` returns (whole microseconds over 10**6, one rounding). An
 * offset other than UTC, or a value that is not a datetime, is asked for ``.timestamp()``. */
static PyObject *timestamps(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *events, *cls, *name;
    if (!PyArg_ParseTuple(args, "O!O!U:timestamps", &PyList_Type, &events, &PyType_Type, &cls, &name)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(events);
    slot_t slots[MAX_TYPES];
    int ntypes = 0;
    if (all_of_type(events, cls) < 0) return NULL;
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *event = PyList_GET_ITEM(events, i), *value, *seconds = NULL;
        value = field(event, slots, &ntypes, name);
        if (value == NULL) goto fail;
        if (PyDateTime_CheckExact(value) && PyDateTime_DATE_GET_TZINFO(value) == PyDateTime_TimeZone_UTC) {
            int64_t us = utc_micros(value);
            if (us > -(1LL << 53) && us < (1LL << 53)) seconds = PyFloat_FromDouble((double)us / 1e6);
        }
        if (seconds == NULL && !PyErr_Occurred()) seconds = PyObject_CallMethod(value, "timestamp", NULL);
        if (seconds == NULL) goto fail;
        PyList_SET_ITEM(out, i, seconds);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"timestamps", timestamps, METH_VARARGS, "timestamps(events, cls, field) -> [epoch seconds]"},
    {"combine", combine, METH_VARARGS,
     "combine(events, cls, fields) -> (int32 codes as bytes, [distinct combinations as tuples])"},
    {"gather", gather, METH_VARARGS,
     "gather(events, cls, ((field, kind), ...)) -> per field: (null_count, validity, *buffers), or a bool for "
     "kind ANY_LEN (some value is non-empty)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) return NULL;
    return PyModule_Create(&module);
}

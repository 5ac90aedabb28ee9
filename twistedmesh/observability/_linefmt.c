/*
 * twistedmesh.observability._linefmt: the access log's text line, rendered in C.
 *
 * A compiled text format (twistedmesh/observability/accesslog.py, CompiledFormat) is a list of literals and
 * operators. In Python the default line costs about 19,500 interpreter instructions, most of them attribute
 * loads, `or` tests and the %-formatting of bytes; here it costs about 6,000. The Python render stays the
 * reference: this module only ever produces the line it gives, and for anything it does not expect (a value
 * that is not bytes, a line that is not ASCII, a number too large, a getter that raises) it calls that render
 * (`fallback`) instead of guessing, which also raises what Python raises.
 *
 * Format(ops, requestNames, responseNames, fallback) is called as format(record, endTime) -> bytes. Each op
 * is a tuple, built by accesslog._nativeOp:
 *
 *   ("lit", bytes)                      literal text
 *   ("value", sources, maxLen)          the first source that is set, else "-", cut to maxLen (or None);
 *                                       sources: ("field", attribute name) is set when non-empty;
 *                                       ("request" | "response", slot) is set when the header came in,
 *                                       even empty (an empty value logs as "-")
 *   ("int", attribute name)             an int attribute, in decimal
 *   ("duration",)                       round((endTime - startTime) * 1e6) // 1000, in decimal
 *   ("time", timeFormat, millis)        START_TIME with one %3f: timeFormat.headData, millis[ms],
 *                                       timeFormat.tailData; timeFormat.advance(second) when the second moves
 *   ("protocol", table, getter)         table.get(record.version), else getter(record, endTime) encoded
 *   ("flags", join)                     "-" when record.responseFlags is empty, else join(flags) encoded
 *   ("host", cache, address)            record.upstreamHost's (cache.get(endpoint) or address(endpoint))[1]
 *   ("call", getter)                    getter(record, endTime), a str, encoded
 *
 * requestNames / responseNames are the header names (lowercase bytes) whose first values the "request" /
 * "response" sources read, by slot; one pass over each header list finds them all.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>  /* T_OBJECT_EX */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_OPS 128        /* a format with more operators stays in Python */
#define MAX_HEADERS 16     /* header names per list */
#define MAX_SOURCES 4      /* sources of one value (X?Y has two) */
#define SEGMENTS_PER_OP 3  /* the time op writes three */

enum { OP_LIT, OP_VALUE, OP_INT, OP_DURATION, OP_TIME, OP_PROTOCOL, OP_FLAGS, OP_HOST, OP_CALL };
enum { SRC_FIELD, SRC_REQUEST, SRC_RESPONSE };

typedef struct {
    int kind;
    PyObject *name;  /* SRC_FIELD: the attribute name */
    int slot;        /* SRC_REQUEST / SRC_RESPONSE: the header's slot */
} Source;

typedef struct {
    int kind;
    PyObject *a;     /* lit: bytes; int: name; time: the time format; protocol: table; flags: join;
                        host: cache; call: getter */
    PyObject *b;     /* time: millis tuple; protocol: getter; host: address */
    Py_ssize_t maxLen;
    int nsources;
    Source sources[MAX_SOURCES];
    /* time: the second whose text is cached here (a reference's own cache may move to other seconds) */
    int hasSecond;
    long long second;
    PyObject *head, *tail;
} Op;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int nops;
    Op ops[MAX_OPS];
    int nrequest, nresponse;
    PyObject *requestNames[MAX_HEADERS];
    PyObject *responseNames[MAX_HEADERS];
    PyObject *fallback;
} FormatObject;

static PyObject *s_requestHeaders, *s_responseHeaders, *s_startTime, *s_version, *s_responseFlags,
    *s_upstreamHost, *s_endpoint, *s_advance, *s_headData, *s_tailData;
static PyObject *dash;  /* b"-" */

/* Python's round() of a float (halves to even), as a C integer; 0 when it does not fit (the caller falls
 * back to the reference, which raises or prints what Python prints). */
static int
roundHalfEven(double x, long long *out)
{
    double rounded;
    if (!isfinite(x))
        return 0;
    rounded = round(x);
    if (fabs(x - rounded) == 0.5)
        rounded = 2.0 * round(x / 2.0);
    if (rounded >= 9.0e18 || rounded <= -9.0e18)
        return 0;
    *out = (long long)rounded;
    return 1;
}

static long long
floorDiv(long long a, long long b)
{
    long long q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
        q -= 1;
    return q;
}

/* A float or a small int as a double; 0 for anything else. */
static int
asDouble(PyObject *o, double *out)
{
    if (PyFloat_CheckExact(o)) {
        *out = PyFloat_AS_DOUBLE(o);
        return 1;
    }
    if (PyLong_CheckExact(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        /* Python computes with ints exactly; a double does too while v * 1e6 stays below 2**53. */
        if (overflow || (v == -1 && PyErr_Occurred()) || v > 9007199254LL || v < -9007199254LL) {
            PyErr_Clear();
            return 0;
        }
        *out = (double)v;
        return 1;
    }
    return 0;
}

/* Decimal digits of v at the end of buf (size 24); returns the start. */
static char *
decimal(long long v, char *end)
{
    unsigned long long u = v < 0 ? (unsigned long long)(-(v + 1)) + 1 : (unsigned long long)v;
    char *p = end;
    do {
        *--p = (char)('0' + (u % 10));
        u /= 10;
    } while (u);
    if (v < 0)
        *--p = '-';
    return p;
}

/* Whether n bytes at p are all below 0x80: eight at a time. */
static int
isASCII(const char *p, Py_ssize_t n)
{
    uint64_t word, high = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&word, p + i, 8);
        high |= word;
    }
    for (; i < n; i++)
        high |= (unsigned char)p[i];
    return (high & 0x8080808080808080ULL) == 0;
}

/* obj.name. For an attribute a __slots__ class keeps (the stream's and the TCP record's fields), read from
 * its slot directly, as the member descriptor the class's own lookup finds would read it: about a fifth of
 * the generic path's cost. Anything else (a property, an instance dict, a __getattribute__ of its own, an
 * unset slot, which raises) takes the generic path. */
static PyObject *
fieldOf(PyObject *obj, PyObject *name)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type->tp_getattro == PyObject_GenericGetAttr) {
        PyObject *descr = _PyType_Lookup(type, name);  /* borrowed; the type's attribute cache */
        /* (A slot's descriptor can be put on an unrelated class: it applies only to its own class's
         * instances, whose layout has the slot; for others the generic path raises TypeError.) */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && PyObject_TypeCheck(obj, PyDescr_TYPE(descr))) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            if (member->type == T_OBJECT_EX) {
                PyObject *v = *(PyObject **)((char *)obj + member->offset);
                if (v != NULL) {
                    Py_INCREF(v);
                    return v;
                }
            }
        }
    }
    return PyObject_GetAttr(obj, name);
}

/* Scan one header list for the wanted names (first value wins). Returns 1, 0 for a list of unexpected
 * shape (the caller falls back), -1 on error. found[] gets new references. */
static int
scanHeaders(PyObject *record, PyObject *attr, PyObject **names, int n, PyObject **found)
{
    PyObject *headers, *seq;
    Py_ssize_t i, count;
    int j, left = n, ok = 1;
    headers = fieldOf(record, attr);
    if (headers == NULL)
        return -1;
    seq = PySequence_Fast(headers, "header list");
    Py_DECREF(headers);
    if (seq == NULL) {
        PyErr_Clear();
        return 0;
    }
    count = PySequence_Fast_GET_SIZE(seq);
    for (i = 0; i < count && left; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *key;
        Py_ssize_t len;
        const char *data;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) {
            ok = 0;
            break;
        }
        key = PyTuple_GET_ITEM(item, 0);
        if (!PyBytes_CheckExact(key)) {
            ok = 0;
            break;
        }
        len = PyBytes_GET_SIZE(key);
        data = PyBytes_AS_STRING(key);
        for (j = 0; j < n; j++) {
            PyObject *name = names[j];
            if (found[j] == NULL && PyBytes_GET_SIZE(name) == len && memcmp(PyBytes_AS_STRING(name), data, len) == 0) {
                found[j] = PyTuple_GET_ITEM(item, 1);
                Py_INCREF(found[j]);
                left--;
                break;
            }
        }
    }
    Py_DECREF(seq);
    return ok;
}

/* A getter's str result as UTF-8 (kept alive in *keep); 0 when it is not a str. */
static int
strSegment(PyObject *value, const char **ptr, Py_ssize_t *len)
{
    if (!PyUnicode_CheckExact(value))
        return 0;
    *ptr = PyUnicode_AsUTF8AndSize(value, len);
    if (*ptr == NULL) {
        PyErr_Clear();  /* a lone surrogate: the reference escapes it */
        return 0;
    }
    return 1;
}

/* record.startTime as a double: 1, or 0 when it is not a float or a small int (the caller falls back), or
 * -1 with the error set. */
static int
startTimeOf(PyObject *record, double *start)
{
    PyObject *v = fieldOf(record, s_startTime);
    int ok;
    if (v == NULL)
        return -1;
    ok = asDouble(v, start);
    Py_DECREF(v);
    return ok;
}

/* A getter's text, getter(record, endTime), as a segment (the result kept in keep[]): 1, or 0 for a result
 * that is not a str (the caller falls back), or -1 with the getter's exception set. */
static int
getterSegment(PyObject *getter, PyObject *record, PyObject *endTime, PyObject **keep, int *nkeep,
              const char **ptr, Py_ssize_t *len)
{
    PyObject *v = PyObject_CallFunctionObjArgs(getter, record, endTime, NULL);
    if (v == NULL)
        return -1;
    keep[(*nkeep)++] = v;
    return strSegment(v, ptr, len);
}

static PyObject *
Format_vectorcall(PyObject *selfObject, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FormatObject *self = (FormatObject *)selfObject;
    PyObject *record, *endTime;
    PyObject *request[MAX_HEADERS] = {NULL}, *response[MAX_HEADERS] = {NULL};
    PyObject *keep[MAX_OPS * MAX_SOURCES];  /* at most MAX_SOURCES (4) references per op */
    const char *ptr[MAX_OPS * SEGMENTS_PER_OP];
    Py_ssize_t len[MAX_OPS * SEGMENTS_PER_OP];
    char digits[MAX_OPS][24];
    int nkeep = 0, nseg = 0, i, j, status = 1;  /* status: 1 fine, 0 fall back, -1 error */
    Py_ssize_t total = 0;
    PyObject *result = NULL;

    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a format takes (record, endTime)");
        return NULL;
    }
    record = args[0];
    endTime = args[1];

    if (self->nrequest)
        status = scanHeaders(record, s_requestHeaders, self->requestNames, self->nrequest, request);
    if (status == 1 && self->nresponse)
        status = scanHeaders(record, s_responseHeaders, self->responseNames, self->nresponse, response);

    for (i = 0; status == 1 && i < self->nops; i++) {
        Op *op = &self->ops[i];
        PyObject *v;
        switch (op->kind) {
        case OP_LIT:
            ptr[nseg] = PyBytes_AS_STRING(op->a);
            len[nseg++] = PyBytes_GET_SIZE(op->a);
            break;
        case OP_VALUE: {
            PyObject *chosen = NULL;
            for (j = 0; j < op->nsources && chosen == NULL; j++) {
                Source *s = &op->sources[j];
                if (s->kind == SRC_FIELD) {
                    v = fieldOf(record, s->name);
                    if (v == NULL) {
                        status = -1;
                        break;
                    }
                    keep[nkeep++] = v;
                    if (v == Py_None || (PyBytes_CheckExact(v) && PyBytes_GET_SIZE(v) == 0))
                        continue;  /* an empty field is unset */
                    chosen = v;
                } else {
                    chosen = (s->kind == SRC_REQUEST ? request : response)[s->slot];  /* even empty */
                }
            }
            if (status != 1)
                break;
            if (chosen == NULL)
                chosen = dash;
            if (!PyBytes_CheckExact(chosen)) {
                status = 0;
                break;
            }
            ptr[nseg] = PyBytes_AS_STRING(chosen);
            len[nseg] = PyBytes_GET_SIZE(chosen);
            if (len[nseg] == 0) {
                ptr[nseg] = "-";
                len[nseg] = 1;
            }
            if (op->maxLen >= 0 && len[nseg] > op->maxLen)
                len[nseg] = op->maxLen;
            nseg++;
            break;
        }
        case OP_INT: {
            long long n;
            int overflow;
            v = fieldOf(record, op->a);
            if (v == NULL) {
                status = -1;
                break;
            }
            if (!PyLong_CheckExact(v)) {  /* a bool, None, a float: the reference says what it is */
                Py_DECREF(v);
                status = 0;
                break;
            }
            n = PyLong_AsLongLongAndOverflow(v, &overflow);
            Py_DECREF(v);
            if (overflow) {
                status = 0;
                break;
            }
            ptr[nseg] = decimal(n, digits[i] + 24);
            len[nseg] = digits[i] + 24 - ptr[nseg];
            nseg++;
            break;
        }
        case OP_DURATION: {
            double start, end;
            long long us;
            status = startTimeOf(record, &start);
            if (status != 1)
                break;
            if (!asDouble(endTime, &end) || !roundHalfEven((end - start) * 1000000.0, &us)) {
                status = 0;
                break;
            }
            ptr[nseg] = decimal(floorDiv(us, 1000), digits[i] + 24);
            len[nseg] = digits[i] + 24 - ptr[nseg];
            nseg++;
            break;
        }
        case OP_TIME: {
            double start;
            long long us, second, millis;
            PyObject *item;
            status = startTimeOf(record, &start);
            if (status != 1)
                break;
            if (!roundHalfEven(start * 1000000.0, &us)) {
                status = 0;
                break;
            }
            second = floorDiv(us, 1000000);
            millis = (us - second * 1000000) / 1000;
            if (!op->hasSecond || op->second != second) {
                PyObject *head, *tail, *r, *n = PyLong_FromLongLong(second);
                r = n ? PyObject_CallMethodOneArg(op->a, s_advance, n) : NULL;
                Py_XDECREF(n);
                if (r == NULL) {
                    status = -1;
                    break;
                }
                Py_DECREF(r);
                head = PyObject_GetAttr(op->a, s_headData);
                tail = head ? PyObject_GetAttr(op->a, s_tailData) : NULL;
                if (tail == NULL) {
                    Py_XDECREF(head);
                    status = -1;
                    break;
                }
                if (!PyBytes_CheckExact(head) || !PyBytes_CheckExact(tail)) {
                    Py_DECREF(head);
                    Py_DECREF(tail);
                    status = 0;
                    break;
                }
                Py_XSETREF(op->head, head);
                Py_XSETREF(op->tail, tail);
                op->second = second;
                op->hasSecond = 1;
            }
            /* This line holds its own references: a getter called later in it may render another
             * second through this format, which replaces the cached text. */
            Py_INCREF(op->head);
            keep[nkeep++] = op->head;
            Py_INCREF(op->tail);
            keep[nkeep++] = op->tail;
            item = PyTuple_GET_ITEM(op->b, millis);
            ptr[nseg] = PyBytes_AS_STRING(op->head);
            len[nseg++] = PyBytes_GET_SIZE(op->head);
            ptr[nseg] = PyBytes_AS_STRING(item);
            len[nseg++] = PyBytes_GET_SIZE(item);
            ptr[nseg] = PyBytes_AS_STRING(op->tail);
            len[nseg++] = PyBytes_GET_SIZE(op->tail);
            break;
        }
        case OP_PROTOCOL: {
            PyObject *version = fieldOf(record, s_version), *known;
            if (version == NULL) {
                status = -1;
                break;
            }
            known = PyDict_GetItemWithError(op->a, version);
            Py_DECREF(version);
            if (known == NULL && PyErr_Occurred()) {
                PyErr_Clear();  /* unhashable: the reference */
                status = 0;
                break;
            }
            if (known != NULL) {
                Py_INCREF(known);
                keep[nkeep++] = known;
            }
            if (known != NULL && PyBytes_CheckExact(known) && PyBytes_GET_SIZE(known)) {
                ptr[nseg] = PyBytes_AS_STRING(known);
                len[nseg++] = PyBytes_GET_SIZE(known);
                break;
            }
            status = getterSegment(op->b, record, endTime, keep, &nkeep, &ptr[nseg], &len[nseg]);
            if (status == 1)
                nseg++;
            break;
        }
        case OP_FLAGS: {
            int set;
            v = fieldOf(record, s_responseFlags);
            if (v == NULL) {
                status = -1;
                break;
            }
            keep[nkeep++] = v;
            set = PyObject_IsTrue(v);
            if (set < 0) {
                status = -1;
                break;
            }
            if (set) {
                v = PyObject_CallOneArg(op->a, v);
                if (v == NULL) {
                    status = -1;
                    break;
                }
                keep[nkeep++] = v;
                if (!strSegment(v, &ptr[nseg], &len[nseg])) {
                    status = 0;
                    break;
                }
            } else {
                len[nseg] = 0;
            }
            if (len[nseg] == 0) {
                ptr[nseg] = "-";
                len[nseg] = 1;
            }
            nseg++;
            break;
        }
        case OP_HOST: {
            PyObject *endpoint, *both;
            v = fieldOf(record, s_upstreamHost);
            if (v == NULL) {
                status = -1;
                break;
            }
            keep[nkeep++] = v;
            if (v == Py_None) {
                ptr[nseg] = "-";
                len[nseg++] = 1;
                break;
            }
            endpoint = fieldOf(v, s_endpoint);
            if (endpoint == NULL) {
                status = -1;
                break;
            }
            keep[nkeep++] = endpoint;
            both = PyDict_GetItemWithError(op->a, endpoint);
            if (both != NULL) {
                Py_INCREF(both);
            } else if (PyErr_Occurred()) {
                PyErr_Clear();
                status = 0;
                break;
            } else {
                both = PyObject_CallOneArg(op->b, endpoint);
                if (both == NULL) {
                    status = -1;
                    break;
                }
            }
            keep[nkeep++] = both;
            if (!PyTuple_CheckExact(both) || PyTuple_GET_SIZE(both) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(both, 1))) {
                status = 0;
                break;
            }
            v = PyTuple_GET_ITEM(both, 1);
            ptr[nseg] = PyBytes_GET_SIZE(v) ? PyBytes_AS_STRING(v) : "-";
            len[nseg++] = PyBytes_GET_SIZE(v) ? PyBytes_GET_SIZE(v) : 1;
            break;
        }
        case OP_CALL:
            status = getterSegment(op->a, record, endTime, keep, &nkeep, &ptr[nseg], &len[nseg]);
            if (status == 1)
                nseg++;
            break;
        }
    }

    if (status == 1) {
        for (i = 0; i < nseg; i++)
            total += len[i];
        result = PyBytes_FromStringAndSize(NULL, total);
        if (result == NULL) {
            status = -1;
        } else {
            char *out = PyBytes_AS_STRING(result);
            for (i = 0; i < nseg; i++) {
                memcpy(out, ptr[i], len[i]);
                out += len[i];
            }
            /* Every line is checked: a byte past 0x7f (a header that is UTF-8, or is not) renders the
             * reference way, which escapes what is not UTF-8. */
            if (!isASCII(PyBytes_AS_STRING(result), total)) {
                Py_CLEAR(result);
                status = 0;
            }
        }
    }
    for (i = 0; i < nkeep; i++)
        Py_DECREF(keep[i]);
    for (i = 0; i < self->nrequest; i++)
        Py_XDECREF(request[i]);
    for (i = 0; i < self->nresponse; i++)
        Py_XDECREF(response[i]);
    if (status == -1) {
        /* A getter (or an attribute) raised: the Python render raises what it raises, in its order. */
        PyErr_Clear();
        status = 0;
    }
    if (status == 0)
        return PyObject_CallFunctionObjArgs(self->fallback, record, endTime, NULL);
    return result;
}

/* -- construction ------------------------------------------------------------------------------------- */

static int
parseSource(PyObject *spec, Source *s, int nrequest, int nresponse)
{
    const char *kind;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(spec, 0))) {
        PyErr_SetString(PyExc_ValueError, "a source is (kind, name or slot)");
        return -1;
    }
    kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(spec, 0));
    if (kind == NULL)
        return -1;
    if (strcmp(kind, "field") == 0) {
        s->kind = SRC_FIELD;
        s->name = PyTuple_GET_ITEM(spec, 1);
        if (!PyUnicode_Check(s->name)) {
            PyErr_SetString(PyExc_ValueError, "a field source names an attribute");
            return -1;
        }
        Py_INCREF(s->name);
        PyUnicode_InternInPlace(&s->name);
        return 0;
    }
    if (strcmp(kind, "request") == 0 || strcmp(kind, "response") == 0) {
        long slot = PyLong_AsLong(PyTuple_GET_ITEM(spec, 1));
        int limit = kind[2] == 'q' ? nrequest : nresponse;
        if (slot < 0 || slot >= limit) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a header slot out of range");
            return -1;
        }
        s->kind = kind[2] == 'q' ? SRC_REQUEST : SRC_RESPONSE;
        s->slot = (int)slot;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "unknown source kind %s", kind);
    return -1;
}

static int
parseNames(PyObject *names, PyObject **out, int *n)
{
    Py_ssize_t i, count;
    if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) > MAX_HEADERS) {
        PyErr_Format(PyExc_ValueError, "header names: a tuple of at most %d", MAX_HEADERS);
        return -1;
    }
    count = PyTuple_GET_SIZE(names);
    for (i = 0; i < count; i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_ValueError, "header names are bytes");
            return -1;
        }
        out[i] = PyTuple_GET_ITEM(names, i);
        Py_INCREF(out[i]);
        *n = (int)(i + 1);
    }
    return 0;
}

static int
parseOp(PyObject *spec, Op *op, int nrequest, int nresponse)
{
    const char *kind;
    Py_ssize_t size, i;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 1 || !PyUnicode_Check(PyTuple_GET_ITEM(spec, 0))) {
        PyErr_SetString(PyExc_ValueError, "an op is a tuple (kind, ...)");
        return -1;
    }
    size = PyTuple_GET_SIZE(spec);
    kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(spec, 0));
    if (kind == NULL)
        return -1;
    op->maxLen = -1;
#define ARGS(n) if (size != (n) + 1) { PyErr_Format(PyExc_ValueError, "op %s takes %d values", kind, n); return -1; }
#define KEEP(field, index) do { op->field = PyTuple_GET_ITEM(spec, index); Py_INCREF(op->field); } while (0)
    if (strcmp(kind, "lit") == 0) {
        ARGS(1);
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(spec, 1))) {
            PyErr_SetString(PyExc_ValueError, "a literal is bytes");
            return -1;
        }
        op->kind = OP_LIT;
        KEEP(a, 1);
    } else if (strcmp(kind, "value") == 0) {
        PyObject *sources, *maxLen;
        ARGS(2);
        sources = PyTuple_GET_ITEM(spec, 1);
        maxLen = PyTuple_GET_ITEM(spec, 2);
        if (!PyTuple_Check(sources) || PyTuple_GET_SIZE(sources) < 1 || PyTuple_GET_SIZE(sources) > MAX_SOURCES) {
            PyErr_Format(PyExc_ValueError, "a value has 1 to %d sources", MAX_SOURCES);
            return -1;
        }
        op->kind = OP_VALUE;
        for (i = 0; i < PyTuple_GET_SIZE(sources); i++) {
            if (parseSource(PyTuple_GET_ITEM(sources, i), &op->sources[i], nrequest, nresponse) < 0)
                return -1;
            op->nsources = (int)(i + 1);
        }
        if (maxLen != Py_None) {
            op->maxLen = PyLong_AsSsize_t(maxLen);
            if (op->maxLen < 0) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "maxLen is a count");
                return -1;
            }
        }
    } else if (strcmp(kind, "int") == 0) {
        ARGS(1);
        op->kind = OP_INT;
        KEEP(a, 1);
        PyUnicode_InternInPlace(&op->a);
    } else if (strcmp(kind, "duration") == 0) {
        ARGS(0);
        op->kind = OP_DURATION;
    } else if (strcmp(kind, "time") == 0) {
        ARGS(2);
        if (!PyTuple_CheckExact(PyTuple_GET_ITEM(spec, 2)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(spec, 2)) != 1000) {
            PyErr_SetString(PyExc_ValueError, "the millis table has 1000 entries");
            return -1;
        }
        for (i = 0; i < 1000; i++) {
            if (!PyBytes_CheckExact(PyTuple_GET_ITEM(PyTuple_GET_ITEM(spec, 2), i))) {
                PyErr_SetString(PyExc_ValueError, "the millis table holds bytes");
                return -1;
            }
        }
        op->kind = OP_TIME;
        KEEP(a, 1);
        KEEP(b, 2);
    } else if (strcmp(kind, "protocol") == 0 || strcmp(kind, "host") == 0) {
        /* A dict (the protocol table, the host cache) and the function for what it does not hold. */
        ARGS(2);
        if (!PyDict_CheckExact(PyTuple_GET_ITEM(spec, 1))) {
            PyErr_Format(PyExc_ValueError, "op %s takes a dict", kind);
            return -1;
        }
        op->kind = kind[0] == 'p' ? OP_PROTOCOL : OP_HOST;
        KEEP(a, 1);
        KEEP(b, 2);
    } else if (strcmp(kind, "flags") == 0) {
        ARGS(1);
        op->kind = OP_FLAGS;
        KEEP(a, 1);
    } else if (strcmp(kind, "call") == 0) {
        ARGS(1);
        op->kind = OP_CALL;
        KEEP(a, 1);
    } else {
        PyErr_Format(PyExc_ValueError, "unknown op %s", kind);
        return -1;
    }
#undef ARGS
#undef KEEP
    return 0;
}

static void
Format_clear(FormatObject *self)
{
    int i, j;
    for (i = 0; i < self->nops; i++) {
        Op *op = &self->ops[i];
        Py_CLEAR(op->a);
        Py_CLEAR(op->b);
        Py_CLEAR(op->head);
        Py_CLEAR(op->tail);
        for (j = 0; j < op->nsources; j++)
            Py_CLEAR(op->sources[j].name);
    }
    self->nops = 0;
    for (i = 0; i < self->nrequest; i++)
        Py_CLEAR(self->requestNames[i]);
    for (i = 0; i < self->nresponse; i++)
        Py_CLEAR(self->responseNames[i]);
    self->nrequest = self->nresponse = 0;
    Py_CLEAR(self->fallback);
}

static PyObject *
Format_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *ops, *requestNames, *responseNames, *fallback;
    FormatObject *self;
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "O!O!O!O:Format", &PyTuple_Type, &ops, &PyTuple_Type, &requestNames,
                          &PyTuple_Type, &responseNames, &fallback))
        return NULL;
    if (PyTuple_GET_SIZE(ops) > MAX_OPS) {
        PyErr_Format(PyExc_ValueError, "at most %d ops", MAX_OPS);
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return NULL;
    }
    self = (FormatObject *)PyType_GenericAlloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = Format_vectorcall;
    Py_INCREF(fallback);
    self->fallback = fallback;
    if (parseNames(requestNames, self->requestNames, &self->nrequest) < 0
        || parseNames(responseNames, self->responseNames, &self->nresponse) < 0)
        goto fail;
    for (i = 0; i < PyTuple_GET_SIZE(ops); i++) {
        self->nops = (int)(i + 1);
        if (parseOp(PyTuple_GET_ITEM(ops, i), &self->ops[i], self->nrequest, self->nresponse) < 0)
            goto fail;
    }
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

static int
Format_traverse(FormatObject *self, visitproc visit, void *arg)
{
    int i;
    for (i = 0; i < self->nops; i++) {
        Py_VISIT(self->ops[i].a);
        Py_VISIT(self->ops[i].b);
    }
    Py_VISIT(self->fallback);
    return 0;
}

static int
Format_tp_clear(FormatObject *self)
{
    Format_clear(self);
    return 0;
}

static void
Format_dealloc(FormatObject *self)
{
    PyObject_GC_UnTrack(self);
    Format_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject FormatType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "twistedmesh.observability._linefmt.Format",
    .tp_doc = "Format(ops, requestNames, responseNames, fallback): a compiled access-log text format; "
              "call it with (record, endTime) for the line as bytes.",
    .tp_basicsize = sizeof(FormatObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(FormatObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = Format_new,
    .tp_traverse = (traverseproc)Format_traverse,
    .tp_clear = (inquiry)Format_tp_clear,
    .tp_dealloc = (destructor)Format_dealloc,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "twistedmesh.observability._linefmt",
    .m_doc = "The access log's text line, rendered in C (see accesslog.CompiledFormat).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__linefmt(void)
{
    PyObject *m;
#define NAME(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    NAME(s_requestHeaders, "requestHeaders");
    NAME(s_responseHeaders, "responseHeaders");
    NAME(s_startTime, "startTime");
    NAME(s_version, "version");
    NAME(s_responseFlags, "responseFlags");
    NAME(s_upstreamHost, "upstreamHost");
    NAME(s_endpoint, "endpoint");
    NAME(s_advance, "advance");
    NAME(s_headData, "headData");
    NAME(s_tailData, "tailData");
#undef NAME
    if ((dash = PyBytes_FromStringAndSize("-", 1)) == NULL)
        return NULL;
    if (PyType_Ready(&FormatType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FormatType);
    if (PyModule_AddObject(m, "Format", (PyObject *)&FormatType) < 0) {
        Py_DECREF(&FormatType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

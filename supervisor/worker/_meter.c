/* The per-request part of RequestMetrics, compiled: meter.PythonMeter in C.
 *
 * Why: a Python middleware that reads the status code needs its own coroutine frame and
 * a Python `send` wrapper, and those alone cost ~3.3% of a hello-world request on uvicorn
 * (bench/metrics_overhead.py --instructions, `layer+send`). Here a request costs one
 * small object that is both the awaitable the server waits on and the `send` the app
 * calls, two clock reads, and two histograms counted in C. PythonMeter is the reference
 * for behaviour, and tests/unit/test_meter.py runs every test on both.
 *
 * Meter(app, websocket, durations, sizes): an ASGI app. An "http" scope gets a Request;
 *   a "websocket" scope goes to websocket(scope, receive, send), anything else straight
 *   to the app. durations and sizes are the histograms' bucket bounds (le).
 *   take() -> (tallies, started) hands over what was measured and starts afresh:
 *   tallies is {(method, route template, status): (duration counts, seconds, size
 *   counts, bytes)}, per-bucket counts with +Inf last; started counts the requests
 *   begun by method, None standing for all unknown methods.
 * Request: delegates await/send/throw/close to the app's awaitable and, the moment that
 *   ends however it ends, counts the request into its label set's tally, as a `finally:`
 *   would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static PyObject *s_type, *s_http, *s_websocket, *s_status, *s_body, *s_method,
    *s_route, *s_http_route, *s_path_format, *s_path, *s_throw, *s_close, *default_status;

/* Interned, so that a known method's hash is cached; the server decodes a new string
 * for every request. */
static const char *method_names[] = {
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
};
#define METHODS (sizeof(method_names) / sizeof(method_names[0]))
static PyObject *known_methods[METHODS];

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter reads on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* a == b for a str b, compared as a dict compares keys once the hashes match. */
static int
same_text(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    if (!PyUnicode_Check(a)) {
        return 0;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(a);
    int kind = PyUnicode_KIND(a);
    return length == PyUnicode_GET_LENGTH(b) && kind == PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)length * kind) == 0;
}

/* mapping.get(key) as a new reference; NULL with no error set when the key is absent. */
static PyObject *
lookup(PyObject *mapping, PyObject *key)
{
    if (PyDict_CheckExact(mapping)) {
        return Py_XNewRef(PyDict_GetItemWithError(mapping, key));
    }
    PyObject *value = PyObject_GetItem(mapping, key);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
    }
    return value;
}

/* mapping[key] as a new reference; KeyError when absent. */
static PyObject *
subscript(PyObject *mapping, PyObject *key)
{
    PyObject *value = lookup(mapping, key);
    if (value == NULL && !PyErr_Occurred()) {
        PyErr_SetObject(PyExc_KeyError, key);
    }
    return value;
}

/* getattr(obj, name, None) as a new reference. */
static PyObject *
attribute(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return value;
}

#define MAX_BOUNDS 32

typedef struct {
    int n;
    double le[MAX_BOUNDS];
} Bounds;

typedef struct {
    uint64_t counts[MAX_BOUNDS + 1]; /* per bucket, +Inf last */
    double total;
} Histogram;

typedef struct {
    Histogram duration, size;
} Tally;

static void
observe(Histogram *histogram, const Bounds *bounds, double value)
{
    int bucket = 0;
    while (bucket < bounds->n && value > bounds->le[bucket]) {
        bucket++;
    }
    histogram->counts[bucket]++;
    histogram->total += value;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *app;
    PyObject *websocket;
    Bounds durations, sizes;
    PyObject *index; /* {(method, template, status): position in tallies} */
    Tally *tallies;
    Py_ssize_t used, allocated;
    uint64_t started[METHODS + 1]; /* requests begun, by known method; the last: others */
    /* The label set of the last request recorded: most requests repeat one, and this
     * skips building and hashing its key. Reset by take(). */
    PyObject *last_method, *last_template, *last_status;
    Py_ssize_t last_position;
} MeterObject;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    MeterObject *meter;
    PyObject *scope;
    PyObject *send;
    PyObject *awaiting; /* what `await app(...)` drives; cleared when the request ends */
    PyObject *method;
    PyObject *status;   /* from http.response.start; NULL before it, recorded as 500 */
    Py_ssize_t size;
    Py_ssize_t scope_keys; /* how many keys the scope had when the request began */
    double start;
    int ended;
} RequestObject;

static void
forget_last(MeterObject *meter)
{
    Py_CLEAR(meter->last_method);
    Py_CLEAR(meter->last_template);
    Py_CLEAR(meter->last_status);
    meter->last_position = -1;
}

/* The template a router left in the scope: scope["route"].path_format (Starlette's
 * Route: the template without converters) or .path, else scope["http_route"]. */
static PyObject *
route_template(PyObject *scope)
{
    PyObject *route = lookup(scope, s_route);
    if (route == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        PyObject *template = lookup(scope, s_http_route);
        return template != NULL || PyErr_Occurred() ? template : Py_NewRef(Py_None);
    }
    if (route == Py_None) {
        return route;
    }
    PyObject *template = attribute(route, s_path_format);
    if (template != NULL) {
        int truthy = PyObject_IsTrue(template);
        if (truthy == 0) {
            Py_SETREF(template, attribute(route, s_path));
        }
        else if (truthy < 0) {
            Py_CLEAR(template);
        }
    }
    Py_DECREF(route);
    return template;
}

/* The tally of a label set, made on first use; valid until the next one is made. */
static Tally *
tally_for(MeterObject *meter, PyObject *method, PyObject *template, PyObject *status)
{
    if (meter->last_position >= 0 && method == meter->last_method &&
        template == meter->last_template && status == meter->last_status) {
        return &meter->tallies[meter->last_position];
    }
    PyObject *key = PyTuple_Pack(3, method, template, status);
    if (key == NULL) {
        return NULL;
    }
    Py_ssize_t position = -1;
    PyObject *found = PyDict_GetItemWithError(meter->index, key); /* borrowed */
    if (found != NULL) {
        position = PyLong_AsSsize_t(found);
    }
    else if (!PyErr_Occurred()) {
        if (meter->used == meter->allocated) {
            Py_ssize_t allocated = meter->allocated ? meter->allocated * 2 : 16;
            Tally *grown = PyMem_Realloc(meter->tallies, allocated * sizeof(Tally));
            if (grown == NULL) {
                PyErr_NoMemory();
                Py_DECREF(key);
                return NULL;
            }
            meter->tallies = grown;
            meter->allocated = allocated;
        }
        PyObject *number = PyLong_FromSsize_t(meter->used);
        if (number != NULL && PyDict_SetItem(meter->index, key, number) == 0) {
            position = meter->used++;
            memset(&meter->tallies[position], 0, sizeof(Tally));
        }
        Py_XDECREF(number);
    }
    Py_DECREF(key);
    if (position < 0) {
        return NULL;
    }
    forget_last(meter);
    meter->last_method = Py_NewRef(method);
    meter->last_template = Py_NewRef(template);
    meter->last_status = Py_NewRef(status);
    meter->last_position = position;
    return &meter->tallies[position];
}

static int
record(RequestObject *self)
{
    double seconds = now() - self->start;
    /* A router adds keys to the scope (Starlette's and FastAPI's: route, endpoint,
     * path_params), so a dict scope that gained none was routed by nobody. */
    PyObject *template = !PyDict_CheckExact(self->scope) ||
                                 PyDict_GET_SIZE(self->scope) > self->scope_keys
                             ? route_template(self->scope)
                             : Py_NewRef(Py_None);
    if (template == NULL) {
        return -1;
    }
    PyObject *status = self->status != NULL ? self->status : default_status;
    MeterObject *meter = self->meter;
    Tally *tally = tally_for(meter, self->method, template, status);
    Py_DECREF(template);
    if (tally == NULL) {
        return -1;
    }
    observe(&tally->duration, &meter->durations, seconds);
    observe(&tally->size, &meter->sizes, (double)self->size);
    return 0;
}

static void
record_or_report(RequestObject *self)
{
    if (record(self) < 0) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
}

/* The request ended (returned, raised, was closed): record it once, leaving whatever
 * exception is in flight as it is. A failure to record is reported, never raised. */
static void
finish(RequestObject *self)
{
    if (self->ended) {
        return;
    }
    self->ended = 1;
    Py_CLEAR(self->awaiting);
    if (!PyErr_Occurred()) { /* the usual end: returned */
        record_or_report(self);
        return;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *raised = PyErr_GetRaisedException();
    record_or_report(self);
    PyErr_SetRaisedException(raised);
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    record_or_report(self);
    PyErr_Restore(type, value, traceback);
#endif
}

static PySendResult
request_am_send(RequestObject *self, PyObject *arg, PyObject **result)
{
    if (self->ended) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse an already awaited request");
        *result = NULL;
        return PYGEN_ERROR;
    }
    PySendResult outcome = PyIter_Send(self->awaiting, arg, result);
    if (outcome != PYGEN_NEXT) {
        finish(self);
    }
    return outcome;
}

/* What a coroutine's send() returns for an outcome of am_send. */
static PyObject *
sent(PySendResult outcome, PyObject *result)
{
    if (outcome != PYGEN_RETURN) {
        return result; /* the value yielded, or NULL with the error set */
    }
    if (result == Py_None) {
        Py_DECREF(result);
        PyErr_SetNone(PyExc_StopIteration);
        return NULL;
    }
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
    Py_DECREF(result);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

static PyObject *
request_iternext(RequestObject *self)
{
    PyObject *result;
    PySendResult outcome = request_am_send(self, Py_None, &result);
    if (outcome == PYGEN_RETURN && result == Py_None) {
        Py_DECREF(result);
        return NULL; /* exhausted: StopIteration(None), implied */
    }
    return sent(outcome, result);
}

static PyObject *
request_send(RequestObject *self, PyObject *arg)
{
    PyObject *result;
    PySendResult outcome = request_am_send(self, arg, &result);
    return sent(outcome, result);
}

/* throw() or close() on the awaited iterator. The request goes on only if it yields
 * again (an app that caught the exception and awaits something else). */
static PyObject *
delegate(RequestObject *self, PyObject *name, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->ended) {
        if (name == s_close) {
            Py_RETURN_NONE;
        }
        if (PyExceptionInstance_Check(args[0])) { /* as a finished coroutine: re-raised */
            PyErr_SetObject((PyObject *)Py_TYPE(args[0]), args[0]);
        }
        else {
            PyErr_SetObject(args[0], nargs > 1 ? args[1] : NULL);
        }
        return NULL;
    }
    PyObject *method = PyObject_GetAttr(self->awaiting, name);
    if (method == NULL && name == s_close && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear(); /* an iterator without close(): nothing to close */
        finish(self);
        Py_RETURN_NONE;
    }
    PyObject *result = method ? PyObject_Vectorcall(method, args, nargs, NULL) : NULL;
    Py_XDECREF(method);
    if (result == NULL || name == s_close) {
        finish(self);
    }
    return result;
}

static PyObject *
request_throw(RequestObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw() takes 1 to 3 arguments");
        return NULL;
    }
    return delegate(self, s_throw, args, nargs);
}

static PyObject *
request_close(RequestObject *self, PyObject *Py_UNUSED(ignored))
{
    return delegate(self, s_close, NULL, 0);
}

/* The app's `send`: notes the status of the start (ASGI: the first message, and the only
 * one with a status; reading it without checking the type saves a lookup per request)
 * and the body bytes of the others, then hands the message to the server's send. */
static PyObject *
request_vectorcall(RequestObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "send() takes exactly one argument, the message");
        return NULL;
    }
    PyObject *message = args[0];
    if (self->status == NULL) {
        self->status = lookup(message, s_status);
        if (self->status != NULL) {
            return PyObject_CallOneArg(self->send, message);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *body = lookup(message, s_body);
    if (body != NULL) {
        Py_ssize_t length =
            PyBytes_CheckExact(body) ? PyBytes_GET_SIZE(body) : PyObject_Length(body);
        Py_DECREF(body);
        if (length < 0) {
            return NULL;
        }
        self->size += length;
    }
    else if (PyErr_Occurred()) {
        return NULL;
    }
    return PyObject_CallOneArg(self->send, message);
}

static PyObject *
request_await(RequestObject *self)
{
    return Py_NewRef(self);
}

static int
request_traverse(RequestObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->meter);
    Py_VISIT(self->scope);
    Py_VISIT(self->send);
    Py_VISIT(self->awaiting);
    Py_VISIT(self->method);
    Py_VISIT(self->status);
    return 0;
}

static int
request_clear(RequestObject *self)
{
    Py_CLEAR(self->meter);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->send);
    Py_CLEAR(self->awaiting);
    Py_CLEAR(self->method);
    Py_CLEAR(self->status);
    return 0;
}

/* Collected before it ended (its task was destroyed): it ends now, as a coroutine's
 * `finally:` runs when the garbage collector closes it. */
static void
request_finalize(RequestObject *self)
{
    if (!self->ended && self->meter != NULL && self->scope != NULL) {
        finish(self);
    }
}

static void
request_dealloc(RequestObject *self)
{
    if (!self->ended && PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    request_clear(self);
    PyObject_GC_Del(self);
}

static PyAsyncMethods request_as_async = {
    .am_await = (unaryfunc)request_await,
    .am_send = (sendfunc)request_am_send,
};

static PyMethodDef request_methods[] = {
    {"send", (PyCFunction)request_send, METH_O, NULL},
    {"throw", (PyCFunction)(void (*)(void))request_throw, METH_FASTCALL, NULL},
    {"close", (PyCFunction)request_close, METH_NOARGS, NULL},
    {NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_supervise.worker._meter.Request",
    .tp_doc = "One HTTP request being measured: the server awaits it, the app sends to it.",
    .tp_basicsize = sizeof(RequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(RequestObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_as_async = &request_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)request_iternext,
    .tp_methods = request_methods,
    .tp_traverse = (traverseproc)request_traverse,
    .tp_clear = (inquiry)request_clear,
    .tp_finalize = (destructor)request_finalize,
    .tp_dealloc = (destructor)request_dealloc,
};

/* The iterator `await awaitable` drives, found as the interpreter finds it. */
static PyObject *
awaitable_iterator(PyObject *awaitable)
{
    if (PyCoro_CheckExact(awaitable)) {
        return Py_NewRef(awaitable);
    }
    PyAsyncMethods *as_async = Py_TYPE(awaitable)->tp_as_async;
    if (as_async == NULL || as_async->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "the ASGI app returned %.100s, which is not awaitable",
                     Py_TYPE(awaitable)->tp_name);
        return NULL;
    }
    PyObject *iterator = as_async->am_await(awaitable);
    if (iterator != NULL && (!PyIter_Check(iterator) || PyCoro_CheckExact(iterator))) {
        PyErr_Format(PyExc_TypeError, "__await__() returned %.100s, not an iterator",
                     Py_TYPE(iterator)->tp_name);
        Py_CLEAR(iterator);
    }
    return iterator;
}

/* The method, as our interned string if it is a known one; *known: its position in
 * known_methods, or METHODS for any other. */
static PyObject *
method_of(PyObject *scope, size_t *known)
{
    PyObject *method = subscript(scope, s_method);
    *known = METHODS;
    if (method != NULL && PyUnicode_CheckExact(method)) {
        for (size_t i = 0; i < METHODS; i++) {
            if (same_text(method, known_methods[i])) {
                Py_SETREF(method, Py_NewRef(known_methods[i]));
                *known = i;
                break;
            }
        }
    }
    return method;
}

static PyObject *
meter_vectorcall(MeterObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "an ASGI app takes (scope, receive, send)");
        return NULL;
    }
    PyObject *scope = args[0], *receive = args[1], *send = args[2];
    PyObject *type = subscript(scope, s_type);
    if (type == NULL) {
        return NULL;
    }
    int http = same_text(type, s_http);
    int websocket = !http && same_text(type, s_websocket);
    Py_DECREF(type);
    if (!http) { /* lifespan, and anything newer, straight to the app */
        return PyObject_Vectorcall(websocket ? self->websocket : self->app, args, 3, NULL);
    }
    size_t known;
    PyObject *method = method_of(scope, &known);
    if (method == NULL) {
        return NULL;
    }
    RequestObject *request = PyObject_GC_New(RequestObject, &RequestType);
    if (request == NULL) {
        Py_DECREF(method);
        return NULL;
    }
    request->vectorcall = (vectorcallfunc)request_vectorcall;
    request->meter = (MeterObject *)Py_NewRef(self);
    request->scope = Py_NewRef(scope);
    request->send = Py_NewRef(send);
    request->awaiting = NULL;
    request->method = method;
    request->status = NULL;
    request->size = 0;
    request->scope_keys = PyDict_CheckExact(scope) ? PyDict_GET_SIZE(scope) : 0;
    request->ended = 0;
    PyObject_GC_Track(request);
    PyObject *app_args[3] = {scope, receive, (PyObject *)request};
    self->started[known]++;
    request->start = now();
    PyObject *awaitable = PyObject_Vectorcall(self->app, app_args, 3, NULL);
    if (awaitable != NULL) {
        request->awaiting = awaitable_iterator(awaitable);
        Py_DECREF(awaitable);
    }
    if (request->awaiting == NULL) { /* the app failed before it could be awaited */
        finish(request);
        Py_DECREF(request);
        return NULL;
    }
    return (PyObject *)request;
}

static int
meter_start_afresh(MeterObject *self)
{
    PyObject *index = PyDict_New();
    if (index == NULL) {
        return -1;
    }
    forget_last(self);
    Py_XSETREF(self->index, index);
    self->used = 0;
    memset(self->started, 0, sizeof(self->started));
    return 0;
}

static PyObject *
counts_of(const Histogram *histogram, const Bounds *bounds)
{
    PyObject *counts = PyList_New(bounds->n + 1);
    for (int i = 0; counts != NULL && i <= bounds->n; i++) {
        PyObject *count = PyLong_FromUnsignedLongLong(histogram->counts[i]);
        if (count == NULL) {
            Py_CLEAR(counts);
            break;
        }
        PyList_SET_ITEM(counts, i, count);
    }
    return counts;
}

static PyObject *
meter_take(MeterObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *tallies = PyDict_New();
    PyObject *key, *number;
    Py_ssize_t at = 0;
    while (tallies != NULL && PyDict_Next(self->index, &at, &key, &number)) {
        const Tally *tally = &self->tallies[PyLong_AsSsize_t(number)];
        PyObject *value = Py_BuildValue(
            "(NdNd)", counts_of(&tally->duration, &self->durations), tally->duration.total,
            counts_of(&tally->size, &self->sizes), tally->size.total);
        if (value == NULL || PyDict_SetItem(tallies, key, value) < 0) {
            Py_CLEAR(tallies);
        }
        Py_XDECREF(value);
    }
    PyObject *started = tallies ? PyDict_New() : NULL;
    for (size_t i = 0; started != NULL && i <= METHODS; i++) {
        PyObject *count = self->started[i] ? PyLong_FromUnsignedLongLong(self->started[i]) : NULL;
        if (self->started[i] &&
            (count == NULL ||
             PyDict_SetItem(started, i < METHODS ? known_methods[i] : Py_None, count) < 0)) {
            Py_CLEAR(started);
        }
        Py_XDECREF(count);
    }
    PyObject *taken = started ? PyTuple_Pack(2, tallies, started) : NULL;
    Py_XDECREF(tallies);
    Py_XDECREF(started);
    if (taken != NULL && meter_start_afresh(self) < 0) {
        Py_CLEAR(taken);
    }
    return taken;
}

static int
bounds_from(PyObject *sequence, Bounds *bounds, const char *name)
{
    PyObject *items = PySequence_Fast(sequence, name);
    if (items == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    if (n > MAX_BOUNDS) {
        PyErr_Format(PyExc_ValueError, "at most %d %s bounds", MAX_BOUNDS, name);
        Py_DECREF(items);
        return -1;
    }
    bounds->n = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        bounds->le[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(items, i));
        if (bounds->le[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(items);
            return -1;
        }
    }
    Py_DECREF(items);
    return 0;
}

static PyObject *
meter_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"app", "websocket", "durations", "sizes", NULL};
    PyObject *app, *websocket, *durations, *sizes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO:Meter", names, &app, &websocket,
                                     &durations, &sizes)) {
        return NULL;
    }
    MeterObject *self = (MeterObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)meter_vectorcall;
    self->app = Py_NewRef(app);
    self->websocket = Py_NewRef(websocket);
    if (bounds_from(durations, &self->durations, "durations") < 0 ||
        bounds_from(sizes, &self->sizes, "sizes") < 0 || meter_start_afresh(self) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
meter_traverse(MeterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->websocket);
    Py_VISIT(self->index);
    Py_VISIT(self->last_method);
    Py_VISIT(self->last_template);
    Py_VISIT(self->last_status);
    return 0;
}

static int
meter_clear(MeterObject *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->websocket);
    Py_CLEAR(self->index);
    forget_last(self);
    return 0;
}

static void
meter_dealloc(MeterObject *self)
{
    PyObject_GC_UnTrack(self);
    meter_clear(self);
    PyMem_Free(self->tallies);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef meter_methods[] = {
    {"take", (PyCFunction)meter_take, METH_NOARGS,
     "take() -> (tallies, started): what was measured since the last take()."},
    {NULL},
};

static PyMemberDef meter_members[] = {
    {"app", T_OBJECT, offsetof(MeterObject, app), READONLY, NULL},
    {"websocket", T_OBJECT, offsetof(MeterObject, websocket), READONLY, NULL},
    {NULL},
};

static PyTypeObject MeterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_supervise.worker._meter.Meter",
    .tp_doc = "Meter(app, websocket, durations, sizes): ASGI middleware counting each "
              "HTTP request's duration and body size by label set.",
    .tp_basicsize = sizeof(MeterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(MeterObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = meter_new,
    .tp_methods = meter_methods,
    .tp_members = meter_members,
    .tp_traverse = (traverseproc)meter_traverse,
    .tp_clear = (inquiry)meter_clear,
    .tp_dealloc = (destructor)meter_dealloc,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asgi_supervise.worker._meter",
    .m_doc = "The per-request part of meter.RequestMetrics, compiled.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__meter(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } strings[] = {
        {&s_type, "type"}, {&s_http, "http"}, {&s_websocket, "websocket"},
        {&s_status, "status"}, {&s_body, "body"},
        {&s_method, "method"}, {&s_route, "route"}, {&s_http_route, "http_route"},
        {&s_path_format, "path_format"}, {&s_path, "path"}, {&s_throw, "throw"},
        {&s_close, "close"},
    };
    for (size_t i = 0; i < sizeof(strings) / sizeof(strings[0]); i++) {
        if ((*strings[i].slot = PyUnicode_InternFromString(strings[i].text)) == NULL) {
            return NULL;
        }
    }
    for (size_t i = 0; i < METHODS; i++) {
        if ((known_methods[i] = PyUnicode_InternFromString(method_names[i])) == NULL) {
            return NULL;
        }
    }
    default_status = PyLong_FromLong(500); /* what the server answers for a failed app */
    if (default_status == NULL || PyType_Ready(&RequestType) < 0 ||
        PyType_Ready(&MeterType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "Meter", (PyObject *)&MeterType) < 0) {
        Py_CLEAR(m);
    }
    return m;
}
